"""Average several checkpoints of one model (WeNet's ``average_model.py`` habit: best N by CV loss, or last N).

Floating-point tensors are averaged in float64 and stored as fp32; integer
buffers (BatchNorm's ``num_batches_tracked``) and the config are the first
source's. Every source must hold the same model: same config ``model:``
section, same keys and shapes, else the first difference is named.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Literal, Sequence

from moe_asr.checkpoint.load import ModelState, read_model_state
from moe_asr.run.layout import CHECKPOINTS, INDEX, CheckpointInfo
from moe_asr.model.config import model_differences


def run_checkpoints(run_dir: str | Path, n: int, by: Literal["best", "last"]) -> list[Path]:
    """The tag directories of the ``n`` best (lowest CV loss first) or last (newest first) complete checkpoints."""
    root = Path(run_dir) / CHECKPOINTS
    index_file = root / INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no checkpoints/{INDEX})")
    index = [CheckpointInfo(**c) for c in json.loads(index_file.read_text())]
    if by == "best":
        index = sorted((c for c in index if c.cv_loss is not None and math.isfinite(c.cv_loss)),
                       key=lambda c: c.cv_loss)
    else:
        index = sorted(index, key=lambda c: c.step, reverse=True)
    if len(index) < n:
        raise ValueError(f"{index_file}: {n} checkpoints asked for, {len(index)} "
                         f"{'with a CV loss ' if by == 'best' else ''}listed ({[c.tag for c in index]})")
    return [root / c.tag for c in index[:n]]


def average(sources: Sequence[str | Path]) -> ModelState:
    """The element-wise mean of the models at ``sources`` (files or checkpoint directories)."""
    if not sources:
        raise ValueError("nothing to average")
    states = [read_model_state(s) for s in sources]
    first = states[0]
    for ms in states[1:]:
        diff = model_differences(first.config.model, ms.config.model)
        if diff:
            raise ValueError(f"{ms.source}: another model than {first.source} (config model.{next(iter(diff))} "
                             f"differs)")
        if ms.state.keys() != first.state.keys():
            key = sorted(ms.state.keys() ^ first.state.keys())[0]
            raise ValueError(f"{ms.source} and {first.source} differ in key {key}")
        wrong = next((k for k, v in first.state.items() if ms.state[k].shape != v.shape), None)
        if wrong:
            raise ValueError(f"{ms.source}: {wrong} has shape {tuple(ms.state[wrong].shape)}, "
                             f"{first.source} {tuple(first.state[wrong].shape)}")
    mean = {k: (sum(ms.state[k].double() for ms in states) / len(states)).float() if v.is_floating_point()
            else v.clone() for k, v in first.state.items()}
    return replace(first, state=mean, extra={"averaged": [str(ms.source) for ms in states]})
