"""The experiment config (one YAML, a section per stage) and its train section.

``ExperimentConfig`` composes the sections, each a dataclass beside the code
that uses it (``data/config.py``, ``model/config.py``, ``moe/config.py``); it
lives with the run folder's format because a run's ``train.yaml`` is one, read
back by everything after training without the engine, and nothing below needs
to know the whole config.

Train section: how long, how fast, how often to save and log. Parallel
section: how the model is laid out over ranks (the model never sees it).

Optimisation hyper-parameters (AdamW, the learning-rate schedule, clipping,
gradient accumulation) live here, with the model they suit, and not in the
DeepSpeed JSON: the JSON files under ``ds_configs/`` only describe the system
(ZeRO stage, precision, communication), so one of them serves every model.
The engine writes these values into DeepSpeed's config and refuses a JSON that
sets them too. Defaults follow WeNet's U2++ recipes (lr 1e-3, 25k warmup
steps, inverse-square-root decay, clip 5).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

from moe_asr.data.config import DataConfig
from moe_asr.data.tokenizer import read_symbol_table
from moe_asr.model.config import AUTO, ModelConfig
from moe_asr.schema import ConfigError, check, dump_yaml, load_yaml

__all__ = ["ExperimentConfig", "ParallelConfig", "TrainConfig", "ConfigError", "decayed", "load_config", "precision",
           "resolve_vocabulary", "save_config", "zero_stage"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    # Stop at whichever comes first; max_steps counts optimizer steps, 0 = no limit.
    max_epochs: int = 100
    max_steps: int = 0
    # AdamW; biases, norms and CMVN-like 1-d parameters get no weight decay.
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    # Linear warmup to `lr` over warmup_steps, then `noam` (WeNet's inverse square root),
    # `cosine` or `linear` decay to min_lr over decay_steps (0: until max_steps), or `constant`.
    warmup_steps: int = 25000
    decay: Literal["noam", "cosine", "linear", "constant"] = "noam"
    decay_steps: int = 0
    min_lr: float = 0.0
    # Global gradient-norm clipping (0: off) and micro-batches per optimizer step.
    grad_clip: float = 5.0
    accum_grad: int = 1
    # Model init, dropout and dynamic-chunk draws; rank r uses seed + r after the model is built.
    seed: int = 777
    # Console/TensorBoard every log_interval steps; a checkpoint every checkpoint_interval
    # steps (0: only at epoch ends) and at every epoch end; the newest keep_checkpoints
    # are kept, plus the best by CV loss.
    log_interval: int = 50
    checkpoint_interval: int = 0
    keep_checkpoints: int = 5
    # A non-finite loss or gradient skips the step; this many in a row stop training.
    max_consecutive_nonfinite: int = 20

    def __post_init__(self) -> None:
        check(self.max_epochs >= 1, "max_epochs", "must be >= 1")
        check(self.max_steps >= 0, "max_steps", "must be >= 0 (0: no limit)")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.weight_decay >= 0 and self.eps > 0, "weight_decay", "needs weight_decay >= 0 and eps > 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
              f"needs two values in [0, 1), got {self.betas}")
        check(self.warmup_steps >= 0 and self.decay_steps >= 0, "warmup_steps", "steps must be >= 0")
        check(self.decay != "noam" or self.warmup_steps > 0, "warmup_steps", "noam decay needs warmup_steps > 0")
        check(self.decay not in ("cosine", "linear") or self.decay_steps > 0 or self.max_steps > 0,
              "decay_steps", f"{self.decay} decay needs decay_steps or max_steps > 0")
        check(0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0: off)")
        check(self.accum_grad >= 1, "accum_grad", "must be >= 1")
        check(self.log_interval >= 1, "log_interval", "must be >= 1")
        check(self.checkpoint_interval >= 0, "checkpoint_interval", "must be >= 0 (0: epoch ends only)")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        check(self.max_consecutive_nonfinite >= 1, "max_consecutive_nonfinite", "must be >= 1")

    @property
    def schedule_steps(self) -> int:
        """Steps over which cosine/linear decay reach min_lr."""
        return self.decay_steps or self.max_steps


def decayed(matrix_dims: int) -> bool:
    """Whether AdamW decays a parameter of this many matrix dimensions (a stack of experts' leading
    dimension not counted): weight matrices yes; biases, norms and CMVN-like 1-d parameters no. The
    optimizer's groups and the planner's bytes (which pad each group) both follow it."""
    return matrix_dims >= 2


@dataclass
class ParallelConfig:
    """How the model is laid out over ranks; models are always built with all experts."""

    # Expert-parallel group size: the engine splits the experts of every MoE layer over this
    # many ranks; the world is world_size / ep_size such groups (data parallel between them).
    ep_size: int = 1

    def __post_init__(self) -> None:
        check(self.ep_size >= 1, "ep_size", f"must be >= 1, got {self.ep_size}")

    def check_world(self, world_size: int) -> None:
        """The one check that needs the launched world: ep_size must divide it."""
        check(world_size % self.ep_size == 0, "parallel.ep_size",
              f"{self.ep_size} does not divide the {world_size} ranks")


@dataclass
class ExperimentConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        # `model.vocab_size: auto` is the symbol table's size: one number fewer to keep in step by hand.
        self.model = resolve_vocabulary(self.model, self.data.tokenizer.symbol_table)
        moe, ep = self.model.moe, self.parallel.ep_size
        check(moe.num_experts % ep == 0, "parallel.ep_size", f"must divide model.moe.num_experts="
              f"{moe.num_experts}, got {ep}")
        check(ep == 1 or moe.impl == "grouped", "parallel.ep_size",
              f"expert parallelism (ep_size={ep}) needs model.moe.impl: grouped, got {moe.impl}")

    @staticmethod
    def migrate(data: dict) -> dict:
        """Configs written before the ``parallel:`` section said ``model.moe.ep_size``: the value moves
        there, with a warning (saved runs keep loading and resume at the layout they were trained at)."""
        model = data.get("model")
        moe = model.get("moe") if isinstance(model, dict) else None
        parallel = data.get("parallel") or {}
        if not (isinstance(moe, dict) and "ep_size" in moe and isinstance(parallel, dict)):
            return data  # nothing to move; a malformed section fails in from_dict, naming its key
        old = moe["ep_size"]
        if "ep_size" in parallel and parallel["ep_size"] != old:
            raise ConfigError(f"model.moe.ep_size: {old!r} conflicts with parallel.ep_size: {parallel['ep_size']!r}; "
                              f"the key moved to parallel.ep_size, remove model.moe.ep_size")
        log.warning("model.moe.ep_size is now parallel.ep_size: read as parallel.ep_size: %s", old)
        moe = {k: v for k, v in moe.items() if k != "ep_size"}
        return {**data, "model": {**model, "moe": moe}, "parallel": {**parallel, "ep_size": old}}


def resolve_vocabulary(model: ModelConfig, symbol_table: Optional[str]) -> ModelConfig:
    """``model`` with ``vocab_size: auto`` replaced by the size of ``symbol_table``.

    The table is read and checked as the tokenizer will read it, so a malformed
    one fails when the config loads, naming the file and line.
    """
    if model.vocab_size != AUTO or symbol_table is None:
        return model
    try:
        table = read_symbol_table(symbol_table, model.sos_eos_id)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.vocab_size: auto reads the symbol table: {e}") from None
    return replace(model, vocab_size=len(table))


def load_config(path: str | Path) -> ExperimentConfig:
    return load_yaml(path, ExperimentConfig)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    dump_yaml(config, path)


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it has no zero_optimization section)."""
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def precision(ds_config: dict) -> str:
    """``bf16``, ``fp16`` or ``fp32``: the training precision a DeepSpeed config asks for."""
    return next((k for k in ("bf16", "fp16") if ds_config.get(k, {}).get("enabled", False)), "fp32")
