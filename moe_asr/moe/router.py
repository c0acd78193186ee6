"""Top-k router: which experts see each token, and with what weight.

WeNet's gate, as in the U2++ MoE paper: a bias-free linear layer, top-k of the
raw logits, softmax over only the chosen k in float32. No noise, no capacity,
no auxiliary loss unless asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Routing:
    weights: Tensor  # [N, k] float32, each row sums to 1
    experts: Tensor  # [N, k] int64 global expert ids


class TopKRouter(nn.Module):
    def __init__(self, d_model: int, num_experts: int, top_k: int,
                 aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        # Side outputs for the engine's logging (detached, last forward only).
        self.tokens_per_expert: Tensor | None = None
        self.entropy: Tensor | None = None

    def forward(self, x: Tensor) -> tuple[Routing, Tensor]:
        """Route ``x [N, d]``; returns the routing and the weighted auxiliary loss."""
        logits = self.gate(x)
        top_logits, experts = logits.topk(self.top_k, dim=-1)
        weights = torch.softmax(top_logits.float(), dim=-1)
        aux = logits.new_zeros((), dtype=torch.float32)
        probs = None
        if self.aux_loss_coef > 0:
            probs = torch.softmax(logits.float(), dim=-1)
            aux = aux + self.aux_loss_coef * load_balancing_loss(probs, experts, self.num_experts)
        if self.z_loss_coef > 0:
            aux = aux + self.z_loss_coef * torch.logsumexp(logits.float(), dim=-1).square().mean()
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert = torch.bincount(experts.flatten(), minlength=self.num_experts)
                p = probs if probs is not None else torch.softmax(logits.detach().float(), dim=-1)
                self.entropy = -(p * p.clamp_min(1e-9).log()).sum(-1).mean()
        return Routing(weights=weights, experts=experts), aux


def load_balancing_loss(probs: Tensor, experts: Tensor, num_experts: int) -> Tensor:
    """Switch-Transformer loss ``E * sum_e f_e * P_e``; equals 1 under uniform routing.

    ``f_e`` is the fraction of the N*k assignments given to expert e (not
    differentiable), ``P_e`` the mean router probability of e (differentiable).
    """
    counts = torch.bincount(experts.flatten(), minlength=num_experts).to(probs.dtype)
    fraction = counts / experts.numel()
    return num_experts * (fraction * probs.mean(0)).sum()
