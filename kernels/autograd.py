"""``torch.autograd.Function``s over the Triton kernels.

* :func:`grouped_ffn`: the expert FFN in two grouped GEMMs. Forward stores the
  pre-activation ``z`` and ``h = act(z)`` (the first GEMM's fused epilogue).
  Backward: ``dZ = (dY @ W2^T) * mask * act'(z)`` in one grouped GEMM (the
  activation's backward fused into its epilogue), ``dX = dZ @ W1^T`` (grouped
  GEMM over transposed views, no copies), ``dW2, db2 = h^T dY, sum dY`` and
  ``dW1, db1 = X^T dZ, sum dZ`` per expert (the weight-gradient kernel).
* :func:`grouped_linear`: one grouped GEMM with bias and activation.
* :func:`permute` / :func:`unpermute`: row gather by the sort order and the
  weighted combine, each other's backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .triton.grouped_gemm import grouped_gemm, grouped_wgrad
from .triton.permute import gather_rows
from .triton.unpermute import combine, combine_backward


class _GroupedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, counts, w1, b1, w2, b2, activation, p):
        mask = None
        if p > 0:
            mask = torch.empty(rows.shape[0], w1.shape[-1], device=rows.device, dtype=rows.dtype)
            mask.bernoulli_(1.0 - p).div_(1.0 - p)
        h, z = grouped_gemm(rows, w1, counts, b1, activation, store_z=True, mask=mask)
        y = grouped_gemm(h, w2, counts, b2)
        ctx.save_for_backward(rows, counts, w1, w2, z, h, mask)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        rows, counts, w1, w2, z, h, mask = ctx.saved_tensors
        e = w1.shape[0]
        dy = dy.contiguous()
        dz = grouped_gemm(dy, w2.transpose(1, 2), counts, activation=ctx.activation, z=z, mask=mask,
                          grad_of_act=True)
        dx = grouped_gemm(dz, w1.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None
        dw2, db2 = grouped_wgrad(h, dy, counts, e, dtype=w2.dtype)
        dw1, db1 = grouped_wgrad(rows, dz, counts, e, dtype=w1.dtype)
        return dx, None, dw1, db1, dw2, db2, None, None


def grouped_ffn(rows: Tensor, counts: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                activation: str = "swish", p: float = 0.0) -> Tensor:
    counts = _device_counts(counts, rows)
    return _GroupedFFN.apply(rows.contiguous(), counts, w1, b1, w2, b2, activation, p)


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, counts, activation):
        if activation == "identity":
            y, z = grouped_gemm(x, w, counts, b), None
        else:
            y, z = grouped_gemm(x, w, counts, b, activation, store_z=True)
        ctx.save_for_backward(x, w, counts, z)
        ctx.has_bias, ctx.activation = b is not None, activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, counts, z = ctx.saved_tensors
        dy = dy.contiguous()
        if z is not None:
            dy = dy * _act_grad(ctx.activation, z)
        dx = grouped_gemm(dy, w.transpose(1, 2), counts)
        dw, db = grouped_wgrad(x, dy, counts, w.shape[0], with_bias=ctx.has_bias, dtype=w.dtype)
        return dx, dw, db, None, None


def _act_grad(name: str, z: Tensor) -> Tensor:
    with torch.enable_grad():
        zz = z.detach().float().requires_grad_()
        from .activations import ACTIVATIONS
        (g,) = torch.autograd.grad(ACTIVATIONS[name](zz).sum(), zz)
    return g.to(z.dtype)


def grouped_linear(x: Tensor, w: Tensor, b: Tensor | None, counts: Tensor, activation: str = "identity") -> Tensor:
    return _GroupedLinear.apply(x.contiguous(), w, b, _device_counts(counts, x), activation)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, inverse, top_k):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return gather_rows(x, order, top_k)

    @staticmethod
    def backward(ctx, drows):
        (inverse,) = ctx.saved_tensors
        return combine(drows, inverse, None, ctx.top_k), None, None, None


def permute(x: Tensor, order: Tensor, inverse: Tensor, top_k: int) -> Tensor:
    """Row i of the result is ``x[order[i] // top_k]``."""
    return _Permute.apply(x, order, inverse, top_k)


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, inverse, weights):
        ctx.save_for_backward(rows, inverse, weights)
        return combine(rows, inverse, weights, weights.shape[1])

    @staticmethod
    def backward(ctx, dy):
        rows, inverse, weights = ctx.saved_tensors
        drows, dw = combine_backward(dy, rows, inverse, weights)
        return drows, None, dw.to(weights.dtype)


def unpermute(rows: Tensor, inverse: Tensor, weights: Tensor) -> Tensor:
    """``out[n] = sum_j weights[n, j] * rows[inverse[n*k + j]]``."""
    return _Unpermute.apply(rows, inverse, weights)


def _device_counts(counts, like: Tensor) -> Tensor:
    if not isinstance(counts, Tensor):
        counts = torch.tensor(list(counts), dtype=torch.int32)
    return counts.to(device=like.device, dtype=torch.int32)
