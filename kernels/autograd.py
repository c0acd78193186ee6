"""``torch.autograd.Function``s over the Triton kernels.

* :func:`grouped_ffn`: the expert FFN in two grouped GEMMs. Forward stores the
  pre-activation ``z`` and ``h = act(z)`` (the first GEMM's fused epilogue)
  only when a backward will follow; without gradients (``inference_mode``,
  ``no_grad``, frozen inputs) it runs the two GEMMs alone and writes no ``z``.
  Backward: ``dZ = (dY @ W2^T) * mask * act'(z)`` in one grouped GEMM (the
  activation's backward fused into its epilogue), ``dX = dZ @ W1^T`` (grouped
  GEMM over transposed views, no copies), ``dW2, db2 = h^T dY, sum dY`` and
  ``dW1, db1 = X^T dZ, sum dZ`` per expert (the weight-gradient kernel).
* :func:`grouped_linear`: one grouped GEMM with bias and activation.
* :func:`permute` / :func:`unpermute`: row gather by the sort order and the
  weighted combine, each other's backward.

Autocast: the GEMM entry points follow autocast's policy for matmuls (as
``F.linear`` does): under ``torch.autocast`` every floating input is cast to
the autocast dtype before the kernels, through differentiable casts, so fp32
master weights receive fp32 gradients. Outside autocast, inputs of mixed
dtypes are refused (``tl.dot`` takes one dtype).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .triton.grouped_gemm import grouped_gemm, grouped_wgrad
from .triton.permute import gather_rows
from .triton.unpermute import combine, combine_backward


def _ffn_forward(rows, counts, w1, b1, w2, b2, activation, p, store_z):
    """(y, z, h, mask) of the expert FFN; ``z`` only with ``store_z``."""
    mask = None
    if p > 0:
        mask = torch.empty(rows.shape[0], w1.shape[-1], device=rows.device, dtype=rows.dtype)
        mask.bernoulli_(1.0 - p).div_(1.0 - p)
    if store_z:
        h, z = grouped_gemm(rows, w1, counts, b1, activation, store_z=True, mask=mask)
    else:
        h, z = grouped_gemm(rows, w1, counts, b1, activation, mask=mask), None
    return grouped_gemm(h, w2, counts, b2), z, h, mask


class _GroupedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, counts, w1, b1, w2, b2, activation, p):
        y, z, h, mask = _ffn_forward(rows, counts, w1, b1, w2, b2, activation, p, store_z=True)
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
    rows, w1, b1, w2, b2 = _autocast(rows, w1, b1, w2, b2)
    _check_dtypes(rows, w1=w1, b1=b1, w2=w2, b2=b2)
    counts = _device_counts(counts, rows, w1.shape[0])
    rows = rows.contiguous()
    if not _needs_grad(rows, w1, b1, w2, b2):
        return _ffn_forward(rows, counts, w1, b1, w2, b2, activation, p, store_z=False)[0]
    return _GroupedFFN.apply(rows, counts, w1, b1, w2, b2, activation, p)


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
    x, w, b = _autocast(x, w, b)
    _check_dtypes(x, w=w, bias=b)
    counts = _device_counts(counts, x, w.shape[0])
    x = x.contiguous()
    if not _needs_grad(x, w, b):
        return grouped_gemm(x, w, counts, b, activation)
    return _GroupedLinear.apply(x, w, b, counts, activation)


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


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast, the floating inputs in the autocast dtype (differentiable casts); else as they are."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _check_dtypes(x: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"grouped GEMM inputs must share one dtype: rows are {x.dtype}, {name} is {t.dtype} "
                             "(cast them, or run under torch.autocast)")


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _device_counts(counts, like: Tensor, num_experts: int) -> Tensor:
    """``counts`` as int32 on ``like``'s device, checked: one entry per expert, and, where they are on the
    host (free to read), non-negative and summing to the rows. Counts already on the GPU are not read back
    (no host sync); the kernels never touch a row at or past ``like.shape[0]`` whatever they say."""
    if not isinstance(counts, Tensor):
        counts = torch.tensor(list(counts), dtype=torch.int32)
    if counts.dim() != 1 or counts.numel() != num_experts:
        raise ValueError(f"counts has shape {tuple(counts.shape)}; expected one entry per expert ({num_experts},)")
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise ValueError(f"counts must be integers, got {counts.dtype}")
    if counts.device.type == "cpu":
        rows = like.shape[0]
        if bool((counts < 0).any()) or int(counts.sum()) != rows:
            raise ValueError(f"counts {counts.tolist()} must be non-negative and sum to the {rows} rows")
    return counts.to(device=like.device, dtype=torch.int32)
