"""A training state that no layout is baked into: continue a run at another ep_size, world size or ZeRO stage.

DeepSpeed refuses its per-rank, per-partition optimizer files under another
layout. :class:`TrainingState` holds the same information by parameter name:
each parameter's full AdamW moments (every expert), Adam's step, where the
learning-rate schedule is, DeepSpeed's step counters and the loop's counters,
plus each old rank's loader position and RNG (usable only at the same world
size). ``moe_asr.checkpoint.training_state`` reads it from a DeepSpeed
checkpoint and converted files carry it; ``moe_asr.engine.training_state``
writes it into an engine of any layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state besides its step


@dataclass
class TrainingState:
    step: int                              # optimizer steps taken (DeepSpeed's global_steps)
    skipped_steps: int                     # of those, skipped for a non-finite gradient
    global_samples: int
    lr_step: int                           # steps the LR schedule has advanced (non-skipped steps)
    adam_step: float                       # AdamW's step count (bias correction)
    moments: dict[str, dict[str, Tensor]]  # parameter name -> {"exp_avg", "exp_avg_sq"}, full tensors
    loop: dict[str, Any]                   # the training loop's counters (epoch, step, ...)
    ranks: list[dict[str, Any]] = field(default_factory=list)  # per old rank: loader, rng, expert_tokens
    layout: dict[str, int] = field(default_factory=dict)       # what it was read from: world, ep_size, zero
