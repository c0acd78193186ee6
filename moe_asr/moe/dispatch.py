"""Token dispatch: group (token, slot) assignments by expert and back.

Permute turns ``N`` tokens with ``k`` experts each into ``N*k`` rows sorted by
expert, so each expert's tokens are one contiguous block (what a grouped GEMM
or an all-to-all wants). Unpermute puts each row back in its (token, slot)
place and sums the k slots with the router weights. The work is done by
``kernels`` (Triton on GPU, plain torch on CPU).
"""
from __future__ import annotations

from torch import Tensor

import moe_asr_kernels as kernels
from moe_asr_kernels import DispatchPlan

__all__ = ["DispatchPlan", "make_plan", "permute", "unpermute"]


def make_plan(experts: Tensor, num_experts: int) -> DispatchPlan:
    """Sort assignments ``experts [N, k]`` by expert id (stable: token order kept within an expert)."""
    return kernels.make_plan(experts, num_experts)


def permute(x: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of ``x [N, d]`` in expert order: ``[N*k, d]``."""
    return kernels.permute(x, plan)


def unpermute(rows: Tensor, plan: DispatchPlan, weights: Tensor) -> Tensor:
    """Weighted sum over the k expert outputs of each token: ``[N*k, d] -> [N, d]``."""
    return kernels.unpermute(rows, plan, weights)
