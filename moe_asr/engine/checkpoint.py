"""DeepSpeed checkpoints with everything an exact resume needs, committed only when complete.

A checkpoint ``<out>/checkpoints/<tag>/`` is DeepSpeed's (``mp_rank_00_model_states.pt``
without experts, one ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt`` per
global expert, optimizer states per rank, LR schedule) plus one
``trainer_state_rank_{r}.pt`` per rank: RNG states (dynamic chunk, dropout),
the data loader's position and the loop counters. DeepSpeed's ``latest`` is
written by rank 0 without waiting for the others, so it is not used for
saving: every rank writes, all ranks meet at a barrier, and only then rank 0
replaces ``latest`` atomically. A rank dying mid-save leaves ``latest`` on the
previous complete checkpoint.

``checkpoints.json`` lists the complete checkpoints with their step, epoch
and CV loss; the newest ``keep`` are kept plus the best by CV loss.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
INDEX = "checkpoints.json"


@dataclass
class CheckpointInfo:
    tag: str
    step: int
    epoch: int
    cv_loss: Optional[float] = None


def trainer_state_file(rank: int) -> str:
    """Rank ``rank``'s loop counters, loader position and RNG inside a checkpoint tag directory."""
    return f"trainer_state_rank_{rank}.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, engine: Any, root: Path, keep: int, rank: int) -> None:
        self.engine = engine
        self.root = Path(root)
        self.keep = keep
        self.rank = rank

    def latest_tag(self) -> Optional[str]:
        path = self.root / LATEST
        return path.read_text().strip() if path.is_file() else None

    def index(self) -> list[CheckpointInfo]:
        path = self.root / INDEX
        return [CheckpointInfo(**c) for c in json.loads(path.read_text())] if path.is_file() else []

    def best(self) -> Optional[CheckpointInfo]:
        scored = [c for c in self.index() if c.cv_loss is not None and math.isfinite(c.cv_loss)]
        return min(scored, key=lambda c: c.cv_loss) if scored else None

    def save(self, info: CheckpointInfo, trainer_state: dict[str, Any]) -> None:
        """Collective: every rank writes its part; ``latest`` moves after all have finished."""
        self.engine.save_checkpoint(str(self.root), info.tag, client_state={"trainer": asdict(info)},
                                    save_latest=False)
        torch.save({**trainer_state, "rng": rng_state()}, self.root / info.tag / trainer_state_file(self.rank))
        dist.barrier()
        if self.rank == 0:
            index = [c for c in self.index() if c.tag != info.tag] + [info]
            _write_atomic(self.root / INDEX, json.dumps([asdict(c) for c in index], indent=1))
            _write_atomic(self.root / LATEST, info.tag)
            self._prune(index)  # only after latest has moved: the previous latest may go
        dist.barrier()

    def _prune(self, index: list[CheckpointInfo]) -> None:
        best = self.best()
        keep = {c.tag for c in index[-self.keep:]} | ({best.tag} if best else set())
        for c in index:
            if c.tag not in keep:
                shutil.rmtree(self.root / c.tag, ignore_errors=True)
        _write_atomic(self.root / INDEX, json.dumps([asdict(c) for c in index if c.tag in keep], indent=1))

    def load(self, tag: str) -> dict[str, Any]:
        """Restore model, optimizer and LR schedule; returns this rank's trainer state (RNG not yet applied)."""
        if not (self.root / tag).is_dir():
            raise FileNotFoundError(f"no checkpoint {tag!r} under {self.root}")
        path, _ = self.engine.load_checkpoint(str(self.root), tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        state_file = self.root / tag / trainer_state_file(self.rank)
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file} is missing: the checkpoint was written by fewer ranks "
                                    f"(resume needs the same number of ranks)")
        return torch.load(state_file, weights_only=False)
