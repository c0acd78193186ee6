"""Expert FFN weights, stacked so grouped kernels can index them by expert.

Each expert is the usual position-wise FFN ``w2(dropout(act(w1 x + b1))) + b2``.
The weights of the local experts are stored as ``w1 [E, d, f]``, ``b1 [E, f]``,
``w2 [E, f, d]``, ``b2 [E, d]`` (``x @ w`` layout) instead of E separate
``nn.Linear`` modules, so the grouped path reads them without stacking copies.
A model is always built with all E experts (the same weights for a given
seed, whatever the training layout); the training engine then keeps one
rank's share with :meth:`Experts.shard`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import moe_asr_kernels as kernels
from moe_asr_kernels.activations import activation as get_activation
from moe_asr_kernels.reference import expert_ffn, moe_loop

PARAMS = ("w1", "b1", "w2", "b2")


class Experts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "swish",
                 dropout: float = 0.0) -> None:
        super().__init__()
        get_activation(activation)  # an unknown name fails here, not at the first forward
        self.num_experts = num_experts
        self.ep_size = 1
        self.first_expert = 0
        self.activation_name = activation
        self.dropout = dropout
        self.w1 = nn.Parameter(_linear_init((num_experts, d_model, d_ff), d_model))
        self.b1 = nn.Parameter(_linear_init((num_experts, d_ff), d_model))
        self.w2 = nn.Parameter(_linear_init((num_experts, d_ff, d_model), d_ff))
        self.b2 = nn.Parameter(_linear_init((num_experts, d_model), d_ff))

    @property
    def num_local(self) -> int:
        return self.w1.shape[0]

    def shard(self, rank: int, size: int) -> None:
        """Keep only the experts ``[rank * E/size, (rank + 1) * E/size)`` of an expert-parallel group."""
        if self.ep_size != 1:
            raise RuntimeError(f"experts are already sharded (ep_size={self.ep_size})")
        if self.num_experts % size or not 0 <= rank < size:
            raise ValueError(f"cannot give rank {rank} of {size} a share of {self.num_experts} experts")
        local = self.num_experts // size
        keep = slice(rank * local, (rank + 1) * local)
        for name in PARAMS:
            setattr(self, name, nn.Parameter(getattr(self, name).data[keep].clone()))
        self.ep_size, self.first_expert = size, rank * local

    def ffn(self, x: Tensor, e: int) -> Tensor:
        """Local expert ``e`` on rows ``x [M, d]``."""
        return expert_ffn(x, self.w1, self.b1, self.w2, self.b2, e, self.activation_name, self.dropout,
                          self.training)

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

    def loop(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        """The same as :meth:`moe` by WeNet's per-expert loop: the reference path."""
        return moe_loop(x, experts, weights, self.w1, self.b1, self.w2, self.b2, self.activation_name,
                        self.dropout, self.training)

    def extra_repr(self) -> str:
        e, d, f = self.w1.shape
        return (f"num_experts={self.num_experts}, local={e} from {self.first_expert}, d_model={d}, "
                f"d_ff={f}, activation={self.activation_name}, dropout={self.dropout}")


def _linear_init(shape: tuple[int, ...], fan_in: int) -> Tensor:
    """``nn.Linear``'s default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)
