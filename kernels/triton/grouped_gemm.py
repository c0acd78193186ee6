"""Grouped GEMM over variable-sized expert groups, one launch for all experts.

Rows ``x [M, K]`` are sorted by expert; expert e owns ``counts[e]`` consecutive
rows and multiplies them by its own ``w[e] [K, N]``. The launch grid is
``(ceil(M / BLOCK_M) + E, ceil(N / BLOCK_N))``: an upper bound on the row tiles
(each group adds at most one partial tile) that needs only M and E, both known
on the host, so the counts never travel to the CPU. Each program maps its tile
index to (expert, row block) itself: a prefix sum of the per-expert tile counts
over a vector of E lanes, then a count of how many experts end at or before the
tile. Programs past the last tile return at once. Empty groups own no tile;
partial tiles are masked.

Epilogues (fused where it saves a pass over ``[M, N]``):
* forward: ``+ bias[e]``, optionally store the pre-activation ``z``, then
  ``act(z)``;
* backward of a previous activation: ``acc * mask * act'(z)`` (the FFN's dH
  -> dZ step), so dZ is produced directly by the dY @ W2^T GEMM.

Weight gradients ``dw[e] = x_e^T @ dy_e`` (and ``db[e] = sum dy_e``) come from
a second kernel with one program per (expert, K block, N block), looping over
the expert's rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..activations import code as act_code
from .common import INTERPRET, act_grad, apply_act, input_precision, next_pow2


def _configs():
    if INTERPRET:  # the interpreter is slow: one small tile, no tuning
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4)]
    out = []
    for bm, bn, bk, w, s in [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                             (64, 256, 64, 8, 4), (32, 128, 64, 4, 4), (16, 128, 128, 4, 4),
                             (128, 64, 64, 4, 4)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s))
    return out


@triton.jit
def _locate_tile(counts_ptr, pid_m, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row of the tile, end row of the expert, valid) of row tile ``pid_m``."""
    lanes = tl.arange(0, E_P2)
    c = tl.load(counts_ptr + lanes, mask=lanes < E, other=0).to(tl.int32)
    tiles = (c + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)                     # inclusive: tiles up to and including expert i
    e = tl.sum((ends <= pid_m).to(tl.int32), 0)     # experts that end at or before this tile
    before = lanes < e
    tile0 = tl.sum(tl.where(before, tiles, 0), 0)
    row0 = tl.sum(tl.where(before, c, 0), 0)
    count = tl.sum(tl.where(lanes == e, c, 0), 0)
    valid = pid_m < tl.sum(tiles, 0)
    return e, row0 + (pid_m - tile0) * BLOCK_M, row0 + count, valid


@triton.autotune(configs=_configs(), key=["N", "K", "M_BUCKET"])
@triton.jit
def _grouped_gemm_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, mask_ptr, counts_ptr,
        N, K, E, M_BUCKET,
        stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
        GRAD_OF_ACT: tl.constexpr, HAS_MASK: tl.constexpr, E_P2: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row0, row_end, valid = _locate_tile(counts_ptr, pid_m, E, E_P2, BLOCK_M)
    if valid:
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < row_end
        n_ok = rn < N
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + rk[:, None] * stride_wk + rn[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        out_mask = m_ok[:, None] & n_ok[None, :]
        offs = rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn
        if GRAD_OF_ACT:
            # acc is dH; turn it into dZ = dH * mask * act'(z) with z the saved pre-activation.
            if HAS_MASK:
                acc = acc * tl.load(mask_ptr + offs, mask=out_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs, mask=out_mask, other=0.0).to(tl.float32)
            acc = acc * act_grad(z, ACT)
        else:
            if HAS_BIAS:
                bias = tl.load(b_ptr + e.to(tl.int64) * stride_be + rn, mask=n_ok, other=0.0)
                acc = acc + bias.to(tl.float32)[None, :]
            if STORE_Z:
                tl.store(z_ptr + offs, acc.to(z_ptr.dtype.element_ty), mask=out_mask)
            acc = apply_act(acc, ACT)
            if HAS_MASK:
                acc = acc * tl.load(mask_ptr + offs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _m_bucket(m: int, e: int) -> int:
    """Coarse size class of the average group, the autotune key (not M itself: it changes every step)."""
    return max(0, (max(1, m // max(1, e))).bit_length() - 4)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, bias: torch.Tensor | None = None,
                 activation: str = "identity", store_z: bool = False, mask: torch.Tensor | None = None,
                 z: torch.Tensor | None = None, grad_of_act: bool = False):
    """``y[rows of e] = act(x[rows of e] @ w[e] + bias[e]) * mask`` for every expert e.

    ``w`` may be any strided view (``w2.transpose(1, 2)`` gives the transposed
    weights without a copy). With ``store_z`` also returns the pre-activation.
    With ``grad_of_act``: ``y = (x @ w[e]) * mask * act'(z)`` (no bias).
    """
    m, k = x.shape
    e, k2, n = w.shape
    assert k == k2, (x.shape, w.shape)
    y = x.new_empty(m, n)
    if store_z:
        z = x.new_empty(m, n)
    if m == 0:
        return (y, z) if store_z else y
    dummy = y
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) + e, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _grouped_gemm_kernel[grid](
        x, w, bias if bias is not None else dummy, y, z if z is not None else dummy,
        mask if mask is not None else dummy, counts,
        n, k, e, _m_bucket(m, e),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        bias.stride(0) if bias is not None else 0, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, ACT=act_code(activation), STORE_Z=store_z,
        GRAD_OF_ACT=grad_of_act, HAS_MASK=mask is not None, E_P2=next_pow2(e),
        PRECISION=input_precision(x.dtype))
    return (y, z) if store_z else y


def _wgrad_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_N": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bk, bn, w, s in [(64, 64, 128, 4, 4), (32, 128, 128, 8, 3), (64, 128, 128, 8, 3),
                                     (32, 64, 64, 4, 4)]]


@triton.autotune(configs=_wgrad_configs(), key=["K", "N", "M_BUCKET"])
@triton.jit
def _grouped_wgrad_kernel(
        x_ptr, dy_ptr, dw_ptr, db_ptr, counts_ptr,
        K, N, E, M_BUCKET,
        stride_xm, stride_xk, stride_dym, stride_dyn, stride_dwe, stride_dwk, stride_dwn, stride_dbe,
        HAS_DB: tl.constexpr, E_P2: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.program_id(2)
    lanes = tl.arange(0, E_P2)
    c = tl.load(counts_ptr + lanes, mask=lanes < E, other=0).to(tl.int32)
    start = tl.sum(tl.where(lanes < e, c, 0), 0)
    end = start + tl.sum(tl.where(lanes == e, c, 0), 0)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = rk < K
    n_ok = rn < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < end
        xt = tl.load(x_ptr + rm[None, :].to(tl.int64) * stride_xm + rk[:, None] * stride_xk,
                     mask=k_ok[:, None] & m_ok[None, :], other=0.0)           # [BLOCK_K, BLOCK_M] = x^T
        g = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dym + rn[None, :] * stride_dyn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)             # [BLOCK_M, BLOCK_N]
        acc = tl.dot(xt, g, acc, input_precision=PRECISION)
        if HAS_DB:
            dbias += tl.sum(g.to(tl.float32), 0)
    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_dwe + rk[:, None] * stride_dwk + rn[None, :] * stride_dwn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])
    if HAS_DB:
        tl.store(db_ptr + e.to(tl.int64) * stride_dbe + rn, dbias.to(db_ptr.dtype.element_ty),
                 mask=n_ok & (pid_k == 0))


def grouped_wgrad(x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor, num_experts: int,
                  with_bias: bool = True, dtype: torch.dtype | None = None):
    """``dw[e] = x_e^T @ dy_e`` ``[E, K, N]`` and ``db[e] = sum_rows dy_e`` ``[E, N]`` (experts without rows: 0)."""
    m, k = x.shape
    n = dy.shape[1]
    dtype = dtype or x.dtype
    dw = x.new_empty(num_experts, k, n, dtype=dtype)
    db = x.new_empty(num_experts, n, dtype=dtype) if with_bias else None
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]), num_experts)  # noqa: E731
    _grouped_wgrad_kernel[grid](
        x, dy, dw, db if db is not None else dw, counts,
        k, n, num_experts, _m_bucket(m, num_experts),
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        db.stride(0) if db is not None else 0,
        HAS_DB=with_bias, E_P2=next_pow2(num_experts), PRECISION=input_precision(x.dtype))
    return dw, db
