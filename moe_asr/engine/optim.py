"""AdamW with DeepSpeed's MoE parameter groups, and the warmup + decay learning-rate schedule.

Parameter groups: weight matrices get weight decay, biases and norm scales do
not; each is then split (``deepspeed_moe.split_moe_param_groups``) into a dense
group and expert groups (``moe: True``, named by the expert-parallel group), which
ZeRO 1/2 partition over the expert-data-parallel ranks.

ZeRO stage 0 in fp32 steps the client optimizer directly; DeepSpeed would clip
there by the mean of the per-rank norms (not the global norm once experts are
split) and would step on a NaN gradient. :class:`Stage0AdamW` does both right
instead; ZeRO 1/2 already compute the global norm over the MoE groups and skip
non-finite steps themselves, so they get plain AdamW and DeepSpeed clips.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from moe_asr.run.config import TrainConfig, decayed
from moe_asr.engine.deepspeed_moe import copies, is_expert_param, split_moe_param_groups


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay / no-decay groups, split into dense and expert-parallel groups."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Stacked experts carry a leading expert dimension: w1 [E, d, f] is a matrix, b1 [E, f] a bias.
            matrix_dims = p.ndim - (1 if is_expert_param(p) else 0)
            (decay if decayed(matrix_dims) else no_decay).append(p)
    return split_moe_param_groups([
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}])


def global_grad_norm(params: list[nn.Parameter]) -> float:
    """L2 norm of the whole model's gradient, counting every expert once.

    After DeepSpeed's reduction a dense gradient is the same on all ranks and an
    expert's gradient on the ranks of its expert-data-parallel group, so each
    rank adds its squares divided by the number of ranks holding that copy.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = torch.zeros((), dtype=torch.float64)
    for p, n in zip(params, copies(params)):
        if p.grad is not None:
            total += p.grad.detach().double().square().sum().cpu() / n
    if world > 1:
        device = params[0].grad.device if params and params[0].grad is not None else torch.device("cpu")
        total = total.to(device)
        dist.all_reduce(total)
    return math.sqrt(total.item())


class Stage0AdamW(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm and skips a non-finite step (ZeRO stage 0, fp32).

    ``overflow`` is DeepSpeed's flag for a skipped step: the engine then counts
    it in ``skipped_steps`` and does not advance the learning-rate schedule.
    """

    def __init__(self, params: list[dict], max_norm: float, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        params = [p for g in self.param_groups for p in g["params"]]
        norm = global_grad_norm(params)
        self.overflow = not math.isfinite(norm)
        if self.overflow:
            return None
        if self.max_norm > 0:
            nn.utils.clip_grads_with_norm_(params, self.max_norm, torch.tensor(norm))
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: TrainConfig, zero_stage: int) -> torch.optim.Optimizer:
    groups_ = param_groups(model, cfg.weight_decay)
    # fused: one pass over the weights per step, where the default CPU AdamW makes about six; the
    # step is memory-bound and an MoE has 2-3x its dense twin's parameters to step.
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
    if zero_stage == 0:
        # Named groups (torch's `param_names`): the saved state then says which moments are whose,
        # which the layout-free training state reads. ZeRO keeps its own names (param_slice_mappings).
        names = {id(p): n for n, p in model.named_parameters()}
        for group in groups_:
            group["param_names"] = [names[id(p)] for p in group["params"]]
        return Stage0AdamW(groups_, cfg.grad_clip, **kwargs)
    return torch.optim.AdamW(groups_, **kwargs)


@dataclass
class WarmupDecay:
    """LR factor after ``step`` optimizer steps: linear warmup, then the configured decay.

    ``noam`` is WeNet's WarmupLR, ``min(s / w, sqrt(w / s))``; ``cosine`` and
    ``linear`` fall from 1 to ``floor`` over ``total`` steps; the factor never
    goes below ``floor`` after warmup.
    """

    warmup: int
    decay: str
    total: int
    floor: float

    def __call__(self, step: int) -> float:
        s = step + 1
        if s <= self.warmup:
            return s / self.warmup
        if self.decay == "noam":
            return max(self.floor, math.sqrt(self.warmup / s))
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.floor + (1 - self.floor) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    return LambdaLR(optimizer, WarmupDecay(cfg.warmup_steps, cfg.decay, cfg.schedule_steps, cfg.min_lr / cfg.lr))
