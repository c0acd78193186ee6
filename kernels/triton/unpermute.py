"""Unpermute: weighted combine of each token's k expert outputs, back in token order.

Forward, one program per (token block, column block), no atomics:
``out[n] = sum_j w[n, j] * rows[inverse[n*k + j]]`` (fp32 accumulation).
Backward, one program per token block looping over the columns, so each
``dw[n, j] = <dy[n], rows[inverse[n*k + j]]>`` is complete in one program:
``drows[inverse[n*k + j]] = w[n, j] * dy[n]``. With no weights (``w = 1``) the
backward is the permute's backward: ``dx[n] = sum_j drows[...]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_pow2, on_device


@triton.jit
def _combine(rows_ptr, inverse_ptr, w_ptr, out_ptr, N, D, stride_r, stride_o,
             TOP_K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = rn < N
    mask = n_ok[:, None] & (rd < D)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        src = tl.load(inverse_ptr + rn * TOP_K + j, mask=n_ok, other=0)
        r = tl.load(rows_ptr + src[:, None] * stride_r + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            r = r * tl.load(w_ptr + rn * TOP_K + j, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        acc += r
    tl.store(out_ptr + rn[:, None].to(tl.int64) * stride_o + rd[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


def combine(rows: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """``out[n] = sum_j w[n, j] * rows[inverse[n*k + j]]`` (``w = 1`` when ``weights`` is None)."""
    rows = rows.contiguous()
    n, d = inverse.numel() // top_k, rows.shape[1]
    out = rows.new_empty(n, d)
    if n == 0:
        return out
    block_d = min(128, next_pow2(d))
    w = weights.contiguous() if weights is not None else rows
    with on_device(rows):
        _combine[(triton.cdiv(n, 16), triton.cdiv(d, block_d))](
            rows, inverse, w, out, n, d, rows.stride(0), out.stride(0),
            TOP_K=top_k, HAS_W=weights is not None, BLOCK_N=16, BLOCK_D=block_d)
    return out


@triton.jit
def _combine_backward(dy_ptr, rows_ptr, inverse_ptr, w_ptr, drows_ptr, dw_ptr, N, D,
                      stride_dy, stride_r, stride_dr,
                      TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    for j in tl.static_range(TOP_K):
        src = tl.load(inverse_ptr + rn * TOP_K + j, mask=n_ok, other=0)
        w = tl.load(w_ptr + rn * TOP_K + j, mask=n_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            mask = n_ok[:, None] & (rd < D)[None, :]
            g = tl.load(dy_ptr + rn[:, None].to(tl.int64) * stride_dy + rd[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            r = tl.load(rows_ptr + src[:, None] * stride_r + rd[None, :], mask=mask, other=0.0).to(tl.float32)
            dw += tl.sum(g * r, 1)
            tl.store(drows_ptr + src[:, None] * stride_dr + rd[None, :],
                     (g * w[:, None]).to(drows_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + rn * TOP_K + j, dw, mask=n_ok)


def combine_backward(dy: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor):
    """Gradients of :func:`combine`: ``(drows [N*k, D], dweights [N, k] float32)``."""
    n, k = weights.shape
    d = rows.shape[1]
    dy, rows = dy.contiguous(), rows.contiguous()
    drows = torch.empty_like(rows)
    dw = torch.empty(n, k, dtype=torch.float32, device=rows.device)
    if n == 0:
        return drows, dw
    block_d = min(128, next_pow2(d))
    with on_device(rows):
        _combine_backward[(triton.cdiv(n, 16),)](
            dy, rows, inverse, weights.contiguous(), drows, dw, n, d, dy.stride(0), rows.stride(0),
            drows.stride(0), TOP_K=k, BLOCK_N=16, BLOCK_D=block_d)
    return drows, dw
