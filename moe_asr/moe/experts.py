"""Expert FFN weights, stacked so grouped kernels can index them by expert.

Each expert is the usual position-wise FFN ``w2(dropout(act(w1 x + b1))) + b2``.
The weights of the local experts are stored as ``w1 [E, d, f]``, ``b1 [E, f]``,
``w2 [E, f, d]``, ``b2 [E, d]`` (``x @ w`` layout) instead of E separate
``nn.Linear`` modules, so the grouped path reads them without stacking copies.
Expert parameters carry DeepSpeed's MoE markers (``allreduce=False``,
``group_name``) so its optimizer grouping and gradient reduction treat them as
expert-parallel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels

ACTIVATIONS = {"swish": F.silu, "relu": F.relu, "gelu": F.gelu}


class Experts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "swish",
                 dropout: float = 0.0, ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__()
        if num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
        self.num_experts = num_experts
        self.num_local = num_experts // ep_size
        self.first_expert = ep_rank * self.num_local
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.dropout = dropout
        local = slice(self.first_expert, self.first_expert + self.num_local)
        # Initialise all E experts, keep the local slice: a model has the same
        # experts for a given seed whatever its ep_size.
        self.w1 = nn.Parameter(_linear_init((num_experts, d_model, d_ff), d_model)[local].clone())
        self.b1 = nn.Parameter(_linear_init((num_experts, d_ff), d_model)[local].clone())
        self.w2 = nn.Parameter(_linear_init((num_experts, d_ff, d_model), d_ff)[local].clone())
        self.b2 = nn.Parameter(_linear_init((num_experts, d_model), d_ff)[local].clone())
        if num_experts > 1:
            for p in self.parameters():
                p.allreduce = False
                p.group_name = f"ep_size_{ep_size}"

    def ffn(self, x: Tensor, e: int) -> Tensor:
        """Local expert ``e`` on rows ``x [M, d]``."""
        h = self.activation(torch.addmm(self.b1[e], x, self.w1[e]))
        h = F.dropout(h, self.dropout, self.training)
        return torch.addmm(self.b2[e], h, self.w2[e])

    def grouped(self, rows: Tensor, counts: Tensor) -> Tensor:
        """All local experts on expert-sorted ``rows [M, d]``; ``counts [E_local]`` rows each.

        One grouped kernel (Triton on GPU, batched torch on CPU) instead of a loop of small matmuls.
        """
        return kernels.grouped_ffn(rows, counts, self.w1, self.b1, self.w2, self.b2,
                                   self.activation_name, self.dropout, self.training)

    def moe(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        """Route, run and combine in one call, for when every expert is local (no all-to-all).

        ``x [N, d]``, ``experts [N, k]`` local ids, ``weights [N, k]``; the kernels may fuse the steps.
        """
        return kernels.moe_ffn(x, experts, weights, self.w1, self.b1, self.w2, self.b2,
                               self.activation_name, self.dropout, self.training)

    def extra_repr(self) -> str:
        e, d, f = self.w1.shape
        return (f"num_experts={self.num_experts}, local={e} from {self.first_expert}, d_model={d}, "
                f"d_ff={f}, activation={self.activation_name}, dropout={self.dropout}")


def _linear_init(shape: tuple[int, ...], fan_in: int) -> Tensor:
    """``nn.Linear``'s default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)
