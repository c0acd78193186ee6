"""DeepSpeed checkpoints with everything an exact resume needs, committed only when complete.

A checkpoint ``<out>/checkpoints/<tag>/`` is DeepSpeed's (``mp_rank_00_model_states.pt``
without experts, one ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt`` per
global expert, optimizer states per rank, LR schedule) plus one
``trainer_state_rank_{r}.pt`` per rank: RNG states (dynamic chunk, dropout),
the data loader's position and the loop counters. DeepSpeed's ``latest`` is
written by rank 0 without waiting for the others, so it is not used for
saving: every rank writes, all ranks meet at a barrier, and only then rank 0
replaces ``latest`` atomically. A rank dying mid-save leaves ``latest`` on the
previous complete checkpoint. A write that fails (no space, quota, permission,
I/O error) fails the save on every rank with one line naming the file and the
OS error, and the partial tag directory is removed (``save_guard.py``).

``checkpoints.json`` lists the complete checkpoints with their step, epoch
and CV loss; the newest ``keep`` are kept plus the best by CV loss.

Integrity: after the barrier every file of the checkpoint is hashed (each
rank a share of the files) and rank 0 writes ``fingerprint.json`` (what the
run was, see ``fingerprint.py``) and then ``manifest.json`` (size and sha256
of every file). The manifest is written last, so a tag directory without one
is a partial checkpoint from a killed save: never resumed. Before anything is
loaded, every rank checks the whole manifest (sizes by all, checksums
shared out), and all ranks stop with the same message naming the bad files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from moe_asr.engine.save_guard import CheckpointSaveError, Writes, failure_message, os_error, warn_if_short
from moe_asr.run.files import load_file
from moe_asr.run.layout import INDEX, LATEST, MANIFEST, CheckpointInfo, trainer_state_file

log = logging.getLogger("moe_asr.train")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed: missing, partial or damaged; the message names the tag and files."""


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _share(items: list, rank: int, world: int) -> list:
    """This rank's part of a job split over the ranks."""
    return items[rank::world]


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank (a collective; one process: just ``obj``)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    """The checkpoints of one run directory (``<out-dir>/checkpoints``), as seen by one rank."""

    def __init__(self, root: Path, keep: int, rank: int) -> None:
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

    def complete(self, tag: str) -> bool:
        return (self.root / tag / MANIFEST).is_file()

    def resume_point(self) -> Optional[str]:
        """``latest`` when it names a complete checkpoint, else the newest complete one listed in the index."""
        tag = self.latest_tag()
        if tag is not None and self.complete(tag):
            return tag
        listed = [c.tag for c in sorted(self.index(), key=lambda c: c.step) if self.complete(c.tag)]
        return listed[-1] if listed else None

    def save(self, engine: Any, info: CheckpointInfo, trainer_state: dict[str, Any],
             fingerprint: dict[str, Any]) -> None:
        """Collective: every rank writes its part; ``latest`` moves after all have finished.

        A write that fails on any rank (no space, quota, permission, I/O error) raises the same
        :class:`CheckpointSaveError` on every rank, once the partial tag directory is removed;
        ``latest`` and the index stay on the previous complete checkpoint.
        """
        tag_dir = self.root / info.tag
        if self.rank == 0:
            if (tag_dir / MANIFEST).is_file():  # the tag is written again: incomplete until the end
                (tag_dir / MANIFEST).unlink()
            last = self.resume_point()
            if last is not None:
                warn_if_short(self.root, self.root / last)
        dist.barrier()
        writes = Writes(self.rank)
        with writes.through(engine):
            engine.save_checkpoint(str(self.root), info.tag, client_state={"trainer": asdict(info)},
                                   save_latest=False)
        writes.save({**trainer_state, "rng": rng_state()}, tag_dir / trainer_state_file(self.rank))
        if self.rank == 0:
            writes.text(tag_dir / "fingerprint.json", json.dumps(fingerprint, indent=1))
        self._agree(writes, tag_dir)  # also the barrier before rank 0 lists every rank's files
        files = _gather(sorted(p.name for p in tag_dir.iterdir() if p.is_file()))[0]  # rank 0's listing for all
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = {name: {"size": (tag_dir / name).stat().st_size, "sha256": _sha256(tag_dir / name)}
                for name in _share(files, self.rank, world)}
        manifest = {k: v for part in _gather(mine) for k, v in part.items()}
        if self.rank == 0:
            index = [c for c in self.index() if c.tag != info.tag] + [info]
            writes.commit({tag_dir / MANIFEST: json.dumps(manifest, indent=1, sort_keys=True),
                           self.root / INDEX: json.dumps([asdict(c) for c in index], indent=1),
                           self.root / LATEST: info.tag})
        self._agree(writes, tag_dir)
        if self.rank == 0:
            self._prune(index)  # only after latest has moved: the previous latest may go
        dist.barrier()

    def _agree(self, writes: Writes, tag_dir: Path) -> None:
        """Collective: if a write failed on any rank, remove the partial tag and raise on every rank."""
        failures = [f for f in _gather(writes.failure) if f is not None]
        if not failures:
            return
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist.barrier()
        raise CheckpointSaveError(failure_message(failures, tag_dir, self.resume_point())) from writes.exception

    def _prune(self, index: list[CheckpointInfo]) -> None:
        """Drop what ``keep`` leaves out: the index first, so a failed write deletes nothing (retried next save)."""
        best = self.best()
        keep = {c.tag for c in index[-self.keep:]} | ({best.tag} if best else set())
        try:
            _write_atomic(self.root / INDEX, json.dumps([asdict(c) for c in index if c.tag in keep], indent=1))
        except OSError as e:
            log.warning("%s: cannot update %s to prune old checkpoints (%s); retried at the next save",
                        self.root, INDEX, os_error(e))
            return
        for c in index:
            if c.tag not in keep:
                shutil.rmtree(self.root / c.tag, ignore_errors=True)

    def verify(self, tag: str) -> None:
        """Collective: raise :class:`CheckpointError` on every rank unless ``tag`` is complete and intact."""
        tag_dir = self.root / tag
        complete = [c.tag for c in self.index() if self.complete(c.tag)]
        if not tag_dir.is_dir():
            raise CheckpointError(f"no checkpoint {tag!r} under {self.root}; complete ones: {complete}")
        if not self.complete(tag):
            raise CheckpointError(f"{tag_dir} is a partial checkpoint (no {MANIFEST}: its save did not finish); "
                                  f"complete ones: {complete}")
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        world = dist.get_world_size() if dist.is_initialized() else 1
        problems = []
        for name, entry in sorted(manifest.items()):
            path = tag_dir / name
            if not path.is_file():
                problems.append(f"{name} missing")
            elif path.stat().st_size != entry["size"]:
                problems.append(f"{name} has {path.stat().st_size} bytes, {entry['size']} were written")
        checked = [n for n in _share(sorted(manifest), self.rank, world) if (tag_dir / n).is_file()
                   and (tag_dir / n).stat().st_size == manifest[n]["size"]]
        problems += [f"{n} does not match its checksum" for n in checked if _sha256(tag_dir / n) != manifest[n]["sha256"]]
        problems = sorted({p for part in _gather(problems) for p in part})
        if problems:
            raise CheckpointError(f"checkpoint {tag_dir} is damaged: {'; '.join(problems[:5])}"
                                  f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}")

    def load(self, engine: Any, tag: str) -> dict[str, Any]:
        """Restore model, optimizer and LR schedule; returns this rank's trainer state (RNG not yet applied).

        Call :meth:`verify` first: DeepSpeed's loaders fail deep inside on a damaged file.
        """
        path, _ = engine.load_checkpoint(str(self.root), tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        state_file = self.root / tag / trainer_state_file(self.rank)
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file} is missing: the checkpoint was written by fewer ranks "
                                    f"(resume needs the same number of ranks)")
        return load_file(state_file)
