"""Expert load: tokens routed to each expert and router entropy, per log window and over the run.

The routers keep these for their last training forward (``tokens_per_expert``,
``entropy``); routers of ``impl: deepspeed`` layers keep nothing (DeepSpeed's
gate routes), and then nothing is counted. The window sums are this rank's:
the loop reduces them over the ranks together with its own sums (``pack``,
``unpack``). The run totals feed the end-of-run load heatmap and travel in
checkpoints as ``expert_tokens``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from moe_asr.engine.distributed import all_reduce
from moe_asr.moe.layer import MoEFeedForward


class ExpertLoad:
    """Routed tokens [layers, experts] and summed router entropy [layers] of one rank."""

    def __init__(self, layers: Mapping[str, MoEFeedForward], num_experts: int, device: torch.device) -> None:
        self.routers = [m.router for m in layers.values()]
        self.shape = (len(self.routers), num_experts)
        self.device = device
        self.total = torch.zeros(self.shape, dtype=torch.int64)  # whole run, on the CPU like a checkpoint
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
        self.total += tokens.cpu()
        self.entropy += torch.stack([r.entropy.double() for r in self.routers])

    def pack(self) -> dict[str, Tensor]:
        """The window sums by name, to be summed over the ranks."""
        return {"moe_tokens": self.tokens, "moe_entropy": self.entropy}

    @staticmethod
    def unpack(sums: Mapping[str, Tensor], batches: float) -> tuple[Tensor, Tensor]:
        """Reduced ``pack`` sums -> (tokens per layer and expert, mean router entropy per layer over ``batches``)."""
        return sums["moe_tokens"].long(), sums["moe_entropy"] / max(batches, 1)

    def run_totals(self) -> Tensor:
        """The run totals of all ranks (a collective: every rank calls it)."""
        return all_reduce(self.total.to(self.device)).cpu()

    def state_dict(self) -> dict[str, Tensor]:
        return {"expert_tokens": self.total}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.total = state["expert_tokens"]
