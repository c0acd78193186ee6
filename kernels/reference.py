"""Reference implementations: plain per-expert loops, written for clarity, not speed.

Everything the fast paths compute is checked against these in the tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import ACTIVATIONS



def expert_ffn(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, e: int,
               activation: str = "swish", dropout: float = 0.0, training: bool = False) -> Tensor:
    """Expert ``e`` on rows ``x [M, d]``: ``dropout(act(x @ w1[e] + b1[e])) @ w2[e] + b2[e]``."""
    h = ACTIVATIONS[activation](torch.addmm(b1[e], x, w1[e]))
    h = F.dropout(h, dropout, training)
    return torch.addmm(b2[e], h, w2[e])


def moe_loop(x: Tensor, experts: Tensor, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
             b2: Tensor, activation: str = "swish", dropout: float = 0.0, training: bool = False) -> Tensor:
    """WeNet's loop: each expert gathers its tokens, runs, and adds its weighted output back.

    ``experts [N, k]`` are indices into the leading dimension of the weights.
    """
    out = x.new_zeros(x.shape[0], w2.shape[-1])
    for e in range(w1.shape[0]):
        tokens, slot = (experts == e).nonzero(as_tuple=True)
        if tokens.numel():
            y = expert_ffn(x[tokens], w1, b1, w2, b2, e, activation, dropout, training)
            out = out.index_add(0, tokens, weights[tokens, slot, None].to(x.dtype) * y)
    return out


def grouped_mm_loop(x: Tensor, w: Tensor, counts: list[int], bias: Tensor | None = None) -> Tensor:
    """``x [M, K]`` in expert order, ``w [E, K, N]``: row block e times ``w[e]`` (+ ``bias[e]``)."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        y = x[start:start + n] @ w[e]
        outs.append(y if bias is None else y + bias[e])
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


def grouped_ffn_loop(rows: Tensor, counts: list[int], w1: Tensor, b1: Tensor, w2: Tensor,
                     b2: Tensor, activation: str = "swish") -> Tensor:
    """All experts on expert-sorted ``rows``, one contiguous block each."""
    h = ACTIVATIONS[activation](grouped_mm_loop(rows, w1, counts, b1))
    return grouped_mm_loop(h, w2, counts, b2)


def sort_by_expert(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Stable sort of the flat (token, slot) assignments: ``(order [N*k], counts [E])``."""
    flat = experts.flatten()
    order = torch.tensor(sorted(range(flat.numel()), key=lambda i: (int(flat[i]), i)), dtype=torch.long)
    counts = torch.tensor([int((flat == e).sum()) for e in range(num_experts)], dtype=torch.long)
    return order, counts


def unpermute_loop(rows: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    """``out[n] = sum_j weights[n, j] * rows[i]`` over the sorted rows ``i`` with ``order[i] = n*k + j``."""
    n, k = weights.shape
    out = rows.new_zeros(n, rows.shape[-1])
    for i, a in enumerate(order.tolist()):
        out[a // k] = out[a // k] + weights[a // k, a % k].to(rows.dtype) * rows[i]
    return out
