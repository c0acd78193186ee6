"""Token dispatch: group (token, slot) assignments by expert and back.

Permute turns ``N`` tokens with ``k`` experts each into ``N*k`` rows sorted by
expert, so each expert's tokens are one contiguous block (what a grouped GEMM
or an all-to-all wants). Unpermute puts each row back in its (token, slot)
place and sums the k slots with the router weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    order: Tensor    # [N*k] int64: flat (token*k + slot) index of each sorted row
    tokens: Tensor   # [N*k] int64: source token of each sorted row (order // k)
    counts: Tensor   # [E] int64: rows per expert, in expert order
    top_k: int


def make_plan(experts: Tensor, num_experts: int) -> DispatchPlan:
    """Sort assignments ``experts [N, k]`` by expert id (stable: token order kept within an expert)."""
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    top_k = experts.shape[1]
    return DispatchPlan(order=order, tokens=torch.div(order, top_k, rounding_mode="floor"),
                        counts=counts, top_k=top_k)


def permute(x: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of ``x [N, d]`` in expert order: ``[N*k, d]``."""
    return x.index_select(0, plan.tokens)


def unpermute(rows: Tensor, plan: DispatchPlan, weights: Tensor) -> Tensor:
    """Weighted sum over the k expert outputs of each token: ``[N*k, d] -> [N, d]``."""
    n, k = weights.shape
    flat = torch.empty_like(rows)
    flat.index_copy_(0, plan.order, rows)
    return torch.einsum("nkd,nk->nd", flat.view(n, k, rows.shape[-1]), weights.to(rows.dtype))
