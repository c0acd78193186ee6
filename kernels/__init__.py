"""MoE expert kernels: token permute, grouped expert FFN, weighted unpermute.

One API, two implementations picked by device:

* ``triton``: Triton kernels (GPU, or CPU tensors under ``TRITON_INTERPRET=1``)
  with their own ``torch.autograd.Function``s; no host sync on the routing.
* ``torch``: plain torch (sort, batched/contiguous per-expert matmuls, gather),
  the CPU path.

``backend="auto"`` takes ``triton`` for CUDA tensors when Triton is installed,
``torch`` otherwise. ``MOE_KERNELS_BACKEND=torch|triton`` overrides ``auto``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from . import cpu
from .cpu import inverse_permutation

__all__ = ["DispatchPlan", "inverse_permutation", "make_plan", "permute", "unpermute", "grouped_ffn", "grouped_mm", "moe_ffn",
           "resolve_backend", "triton_available"]


@dataclass
class DispatchPlan:
    """Where every (token, slot) assignment goes in expert order.

    ``order[i]``: flat assignment (``token * k + slot``) of sorted row i;
    ``tokens[i] = order[i] // k``; ``inverse[a]``: sorted row of assignment a;
    ``counts[e]``: rows of expert e (a device tensor; read it on the host only
    where a sync is fine).
    """

    order: Tensor
    tokens: Tensor
    counts: Tensor
    top_k: int
    inverse: Tensor | None = None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(t: Tensor, backend: str = "auto") -> str:
    if backend == "auto":
        backend = os.environ.get("MOE_KERNELS_BACKEND", "auto")
    if backend == "auto":
        return "triton" if t.is_cuda and triton_available() else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown kernels backend {backend!r}; expected auto, torch or triton")
    return backend


def make_plan(experts: Tensor, num_experts: int, backend: str = "auto") -> DispatchPlan:
    """Sort the assignments ``experts [N, k]`` by expert (stable: token order kept within an expert)."""
    k = experts.shape[1]
    if resolve_backend(experts, backend) == "triton":
        from .triton.permute import sort_by_expert
    else:
        sort_by_expert = cpu.sort_by_expert
    order, inverse, counts = sort_by_expert(experts, num_experts)
    return DispatchPlan(order=order, tokens=order // k, counts=counts, top_k=k, inverse=inverse)


def permute(x: Tensor, plan: DispatchPlan, backend: str = "auto") -> Tensor:
    """Rows of ``x [N, d]`` in expert order: ``[N*k, d]`` (differentiable)."""
    if resolve_backend(x, backend) == "triton":
        from .autograd import permute as triton_permute
        return triton_permute(x, plan.order, _inverse(plan), plan.top_k)
    return cpu.permute(x, plan.tokens)


def unpermute(rows: Tensor, plan: DispatchPlan, weights: Tensor, backend: str = "auto") -> Tensor:
    """Weighted sum of the k expert outputs of each token: ``[N*k, d] -> [N, d]``.

    Differentiable in ``rows`` and in the router ``weights [N, k]``.
    """
    inverse = _inverse(plan)
    if resolve_backend(rows, backend) == "triton":
        from .autograd import unpermute as triton_unpermute
        return triton_unpermute(rows, inverse, weights)
    return cpu.unpermute(rows, inverse, weights)


def _inverse(plan: DispatchPlan) -> Tensor:
    if plan.inverse is None:
        plan.inverse = cpu.inverse_permutation(plan.order)
    return plan.inverse


def grouped_ffn(rows: Tensor, counts: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                activation: str = "swish", dropout: float = 0.0, training: bool = False,
                backend: str = "auto") -> Tensor:
    """Every expert's FFN ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` on its block of ``rows``.

    ``rows [M, d]`` sorted by expert, ``counts [E]`` rows per expert (summing to
    M), ``w1 [E, d, f]``, ``b1 [E, f]``, ``w2 [E, f, d]``, ``b2 [E, d]``.
    Hidden dropout ``dropout`` applies when ``training``.
    """
    if resolve_backend(rows, backend) == "triton":
        from .autograd import grouped_ffn as triton_grouped_ffn
        return triton_grouped_ffn(rows, counts, w1, b1, w2, b2, activation, dropout if training else 0.0)
    return cpu.grouped_ffn(rows, counts, w1, b1, w2, b2, activation, dropout, training)


def moe_ffn(x: Tensor, experts: Tensor, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
            activation: str = "swish", dropout: float = 0.0, training: bool = False,
            backend: str = "auto") -> Tensor:
    """The whole local MoE: ``y[n] = sum_j weights[n, j] * FFN_{experts[n, j]}(x[n])``.

    For when all experts are local (no all-to-all between dispatch and
    experts): the backend may fuse the steps. On the torch backend, a few
    tokens over one padded run of experts skip the sort altogether
    (:func:`kernels.cpu.moe_ffn_small`); otherwise
    :func:`kernels.cpu.moe_ffn_sorted` runs each expert unpadded on its sorted
    rows (in place when no gradient is needed; in training it beats the padded
    ``grouped_ffn`` forward and backward, whose padding, splits and gathers
    cost more than they save at training sizes: ``bench.kernels --preset train``). The
    triton backend runs ``make_plan -> permute -> grouped_ffn -> unpermute``.
    """
    name = resolve_backend(x, backend)
    if name == "torch":
        y = cpu.moe_ffn_small(x, experts, weights, w1, b1, w2, b2, activation, dropout, training)
        return y if y is not None else cpu.moe_ffn_sorted(x, experts, weights, w1, b1, w2, b2, activation,
                                                          dropout, training)
    plan = make_plan(experts, w1.shape[0], name)
    rows = grouped_ffn(permute(x, plan, name), plan.counts, w1, b1, w2, b2, activation, dropout, training, name)
    return unpermute(rows, plan, weights, name)


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor, bias: Tensor | None = None,
               activation: str = "identity", backend: str = "auto") -> Tensor:
    """``act(x[rows of e] @ w[e] + bias[e])`` for every expert e, one launch on the triton backend."""
    if resolve_backend(x, backend) == "triton":
        from .autograd import grouped_linear
        return grouped_linear(x, w, bias, counts, activation)
    from .activations import ACTIVATIONS
    from .reference import grouped_mm_loop
    counts = counts.tolist() if isinstance(counts, Tensor) else list(counts)
    return ACTIVATIONS[activation](grouped_mm_loop(x, w, counts, bias))
