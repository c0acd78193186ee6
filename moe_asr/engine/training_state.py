"""Continue a layout-free training state (``moe_asr.run.training_state``) in a freshly built engine.

DeepSpeed's optimizer files are per rank and per partition (ZeRO flattens
each parameter group and splits it over that group's data-parallel ranks,
expert groups over fewer ranks than dense ones); :func:`apply_training_state`
writes a state held by parameter name into those partitions for whatever
layout the new engine has.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moe_asr.engine.deepspeed_moe import is_expert_param
from moe_asr.moe.layer import MoEFeedForward
from moe_asr.run.training_state import MOMENTS, TrainingState


def _local_slices(model: nn.Module) -> dict[int, slice]:
    """For each expert parameter held in part by this rank: its slice of the full (all-experts) tensor."""
    out = {}
    for m in model.modules():
        if isinstance(m, MoEFeedForward) and m.router is not None:
            local = slice(m.experts.first_expert, m.experts.first_expert + m.experts.num_local)
            for p in m.experts.parameters():
                out[id(p)] = local
    return out


def apply_training_state(engine: Any, model: nn.Module, zero_stage: int, ts: TrainingState,
                         weights: dict[str, Tensor]) -> None:
    """Continue ``ts`` in ``engine``: moments, Adam step, LR schedule and step counters.

    ``weights`` (full fp32 tensors by name) were loaded into the model before the
    engine was built; ZeRO 1/2 also get them as their fp32 master copies, which a
    bf16/fp16 model would otherwise have rounded.
    """
    slices = _local_slices(model)
    named = dict(model.named_parameters())
    missing = sorted(set(named) - set(ts.moments))
    if missing:
        raise ValueError(f"the training state has no optimizer moments for {missing[:3]} "
                         f"({len(missing)} parameters): it belongs to another model")
    step = torch.tensor(float(ts.adam_step))

    def local(name: str, full: Tensor) -> Tensor:
        p = named[name]
        value = full[slices[id(p)]] if is_expert_param(p) else full
        if value.shape != p.shape:
            raise ValueError(f"optimizer moments of {name} have shape {tuple(value.shape)}, the parameter "
                             f"{tuple(p.shape)}")
        return value.to(p.device)

    if zero_stage == 0:
        optimizer = engine.optimizer
        for group in optimizer.param_groups:
            for p, name in zip(group["params"], group["param_names"]):
                optimizer.state[p] = {"step": step.clone(),
                                      **{k: local(name, v).clone() for k, v in ts.moments[name].items()}}
    else:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        # AdamW makes its state at the first step, and ZeRO then links each parameter to its slice of
        # the flat moment partitions: make the state and the links now, so the moments can be written.
        base = engine.optimizer.optimizer
        for group in base.param_groups:
            for flat in group["params"]:
                base.state[flat] = {"step": step.clone(), **{k: torch.zeros_like(flat) for k in MOMENTS}}
        engine.optimizer._lazy_init_hp_params_optimizer_state()
        for name, p in named.items():
            safe_set_full_fp32_param(p, local(name, weights[name]))
            for key, full in ts.moments[name].items():
                safe_set_full_optimizer_state(p, local(name, full), key)
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = ts.lr_step
    scheduler._step_count = ts.lr_step + 1
    scheduler._last_lr = [base_lr * fn(ts.lr_step) for base_lr, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(engine.optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr
    engine.global_steps, engine.skipped_steps, engine.global_samples = ts.step, ts.skipped_steps, ts.global_samples
