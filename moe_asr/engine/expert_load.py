"""Expert load: tokens routed to each expert and router entropy, per optimizer step, per log window
and over the run, and the expert bias that balances them.

The routers keep these for their last training forward (``tokens_per_expert``,
``entropy``); routers of ``impl: deepspeed`` layers keep nothing (DeepSpeed's
gate routes), and then nothing is counted. The window sums are this rank's:
the loop reduces them over the ranks together with its own sums (``pack``,
``unpack``), which gives each layer's max/mean load and, with expert
parallelism, each rank's share of its expert rows. The run totals feed the
end-of-run load plot and travel in checkpoints as ``expert_tokens``. The
step sums (every micro-batch of one optimizer step) move the routers'
expert biases when ``model.moe.bias_update_rate > 0`` (``end_step``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor

from moe_asr.engine.distributed import all_reduce
from moe_asr.moe.layer import MoEFeedForward
from moe_asr.moe.router import choice_bias_step


def max_mean_ratio(tokens: Tensor) -> Tensor:
    """Per layer of ``tokens [layers, experts]``: the busiest expert's tokens over the mean (1: even,
    E: one expert takes every assignment; 0 for a layer that routed nothing)."""
    counts = tokens.double()
    return counts.amax(1) / counts.mean(1).clamp_min(1e-12)


def rank_shares(tokens: Tensor, ep_size: int) -> Tensor:
    """``[layers, ep_size]``: each expert-parallel rank's share of a layer's expert rows (rank r holds
    experts ``r*E/ep_size`` to ``(r+1)*E/ep_size - 1``, as ``Experts.shard`` cuts them). The busiest
    rank is the one the others wait for at the layer's all-to-alls."""
    rows = tokens.double().reshape(tokens.shape[0], ep_size, -1).sum(2)
    return rows / rows.sum(1, keepdim=True).clamp_min(1)


@dataclass
class WindowLoad:
    """One log window's expert load, summed over every rank."""

    tokens: Tensor                # [layers, experts] routed tokens (token-expert assignments)
    entropy: Tensor               # [layers] mean router entropy
    max_mean: Tensor              # [layers] max_mean_ratio
    rank_share: Optional[Tensor]  # [layers, ep_size] rank_shares; None without expert parallelism


class ExpertLoad:
    """Routed tokens [layers, experts] and summed router entropy [layers] of one rank."""

    def __init__(self, layers: Mapping[str, MoEFeedForward], num_experts: int, device: torch.device,
                 ep_size: int = 1, bias_update_rate: float = 0.0) -> None:
        self.routers = [m.router for m in layers.values()]
        self.shape = (len(self.routers), num_experts)
        self.device = device
        self.ep_size = ep_size
        self.bias_update_rate = bias_update_rate
        if bias_update_rate > 0 and any(r.choice_bias.dtype != torch.float32 for r in self.routers):
            # In bf16 a bias of 1 plus a step of 1e-3 is 1 again: balancing would silently stop.
            raise ValueError("the routers' choice_bias must stay float32 (a DeepSpeed buffer_dtype casts it)")
        self.total = torch.zeros(self.shape, dtype=torch.int64)  # whole run, on the CPU like a checkpoint
        self.step_tokens = torch.zeros(self.shape, dtype=torch.int64, device=device)
        self.reset_window()

    def reset_window(self) -> None:
        self.tokens = torch.zeros(self.shape, dtype=torch.int64, device=self.device)
        self.entropy = torch.zeros(self.shape[0], dtype=torch.float64, device=self.device)

    def record(self) -> None:
        """Add the routers' last forward to the window and the run totals."""
        if not self.routers or any(r.tokens_per_expert is None for r in self.routers):
            return  # no MoE layers, or impl 'deepspeed'
        tokens = torch.stack([r.tokens_per_expert for r in self.routers])
        self.tokens += tokens
        self.step_tokens += tokens
        self.total += tokens.cpu()
        self.entropy += torch.stack([r.entropy.double() for r in self.routers])

    def pack(self) -> dict[str, Tensor]:
        """The window sums by name, to be summed over the ranks."""
        return {"moe_tokens": self.tokens, "moe_entropy": self.entropy}

    def unpack(self, sums: Mapping[str, Tensor], batches: float) -> WindowLoad:
        """Reduced ``pack`` sums -> the window's load (entropy averaged over ``batches``)."""
        tokens = sums["moe_tokens"].long()
        return WindowLoad(tokens, sums["moe_entropy"] / max(batches, 1), max_mean_ratio(tokens),
                          rank_shares(tokens, self.ep_size) if self.ep_size > 1 else None)

    def end_step(self) -> None:
        """After each optimizer step, on every rank: with a bias update rate, sum the step's routed
        tokens over all ranks (one all-reduce of ``[layers, experts]``) and move every router's expert
        bias by ``choice_bias_step``; the same sums and arithmetic keep the bias equal on every rank."""
        if self.bias_update_rate > 0 and self.routers:
            tokens = all_reduce(self.step_tokens)
            for router, counts in zip(self.routers, tokens):
                router.choice_bias += choice_bias_step(counts, self.bias_update_rate)
        self.step_tokens.zero_()

    def run_totals(self) -> Tensor:
        """The run totals of all ranks (a collective: every rank calls it)."""
        return all_reduce(self.total.to(self.device)).cpu()

    def state_dict(self) -> dict[str, Tensor]:
        return {"expert_tokens": self.total}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.total = state["expert_tokens"]
