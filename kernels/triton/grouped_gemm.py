"""Grouped GEMM over variable-sized expert groups, one launch for all experts.

Rows ``x [M, K]`` are sorted by expert; expert e owns ``counts[e]`` consecutive
rows and multiplies them by its own ``w[e] [K, N]``. There are at most
``ceil(M / BLOCK_M) + E`` row tiles (each group adds at most one partial tile),
a bound that needs only M and E, both known on the host, so the counts never
travel to the CPU. The grid is one axis over (row tile, column block), in
groups of ``GROUP_M`` row tiles whose column blocks run side by side: the
programs running at once share a few row tiles of X, read from HBM once and
then from L2, instead of X being read again for every column block. Each
program maps its tile index to (expert, row block) itself: a prefix sum of the
per-expert tile counts over a vector of E lanes, then a count of how many
experts end at or before the tile. Programs past the last tile return at once.
Empty groups own no tile; partial tiles are masked; rows at or past M are never
touched, whatever the counts say.

Epilogues (fused where it saves a pass over ``[M, N]``):
* forward: ``+ bias[e]``, optionally store the pre-activation ``z`` (only when
  a backward will read it), then ``act(z)``;
* backward of a previous activation: ``acc * mask * act'(z)`` (the FFN's dH
  -> dZ step), so dZ is produced directly by the dY @ W2^T GEMM.

Weight gradients ``dw[e] = x_e^T @ dy_e`` (and ``db[e] = sum dy_e``) come from
a second kernel over (row chunk, K block, N block): each expert's rows are cut
into chunks of ``chunk`` rows, so a hot expert spreads over the whole GPU
instead of over its K x N tiles alone. An expert of one chunk writes its
gradient directly; the chunks of a split expert write fp32 partial sums to a
workspace that ``_reduce_chunks`` adds up in a fixed order (deterministic, no
atomics) and that also zero-fills experts without rows. The bias gradient is
summed only by the programs of the first K block.

Tiles: ``tuning.py`` (tuned per key on GPU; one small tile in the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..activations import code as act_code
from .common import INTERPRET, act_grad, apply_act, input_precision, next_pow2, on_device
from .tuning import Tile, Tuner, mm_smem, wgrad_smem

GROUP_M = 8

FORWARD_TILES = [Tile(128, 128, 64, 8, 3), Tile(128, 256, 64, 8, 3), Tile(64, 128, 64, 4, 4),
                 Tile(64, 256, 64, 8, 4), Tile(128, 64, 64, 4, 4), Tile(128, 128, 32, 8, 4),
                 Tile(32, 128, 64, 4, 4), Tile(16, 128, 128, 4, 4), Tile(16, 64, 64, 4, 4)]
# block_m: rows summed per step; block_k x block_n: the tile of dW.
WGRAD_TILES = [Tile(64, 128, 64, 4, 4), Tile(32, 128, 128, 8, 3), Tile(64, 128, 128, 8, 3),
               Tile(32, 64, 64, 4, 4), Tile(64, 256, 128, 8, 3)]
FORWARD = Tuner(FORWARD_TILES, Tile(16, 32, 16, 4, 1), mm_smem)
WGRAD = Tuner(WGRAD_TILES, Tile(16, 32, 16, 4, 1), wgrad_smem)

# Weight-gradient row chunks: enough programs for this many waves over the SMs, a workspace of at most
# WORKSPACE_BYTES, and chunks a multiple of CHUNK_ROWS (every row block divides it).
WAVES = 4
WORKSPACE_BYTES = 256 << 20
CHUNK_ROWS = 16 if INTERPRET else 128


@triton.jit
def _locate_tile(counts_ptr, tile, E, E_P2: tl.constexpr, ROWS):
    """Where tile ``tile`` of ``ROWS`` rows lies when each expert's rows are cut into such tiles.

    Returns (expert, index of the tile within the expert, the expert's first row,
    its row count, its tile count, tiles of split experts (more than one tile)
    before it, whether the tile exists).
    """
    lanes = tl.arange(0, E_P2)
    c = tl.maximum(tl.load(counts_ptr + lanes, mask=lanes < E, other=0).to(tl.int32), 0)
    tiles = (c + ROWS - 1) // ROWS
    ends = tl.cumsum(tiles, 0)                     # inclusive: tiles up to and including expert i
    e = tl.sum((ends <= tile).to(tl.int32), 0)      # experts that end at or before this tile
    before = lanes < e
    tile0 = tl.sum(tl.where(before, tiles, 0), 0)
    row0 = tl.sum(tl.where(before, c, 0), 0)
    count = tl.sum(tl.where(lanes == e, c, 0), 0)
    split_before = tl.sum(tl.where(before & (tiles > 1), tiles, 0), 0)
    valid = tile < tl.sum(tiles, 0)
    return e, tile - tile0, row0, count, (count + ROWS - 1) // ROWS, split_before, valid


# Row and expert counts are not specialised on (divisibility by 16): one compile serves every batch size.
@triton.jit(do_not_specialize=["M", "E"])
def _grouped_gemm_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, mask_ptr, counts_ptr,
        M, N, K, E,
        stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
        GRAD_OF_ACT: tl.constexpr, HAS_MASK: tl.constexpr, E_P2: tl.constexpr, GROUP_M: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grouped order: GROUP_M row tiles, all their column blocks, then the next GROUP_M row tiles.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M) + E
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    e, t, row_e, count, _, _, valid = _locate_tile(counts_ptr, pid_m, E, E_P2, BLOCK_M)
    row0 = row_e + t * BLOCK_M
    row_end = tl.minimum(row_e + count, M)
    if valid and row0 < row_end:
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
    """Coarse size class of the average group, the tuning key (not M itself: it changes every step)."""
    return max(0, (max(1, m // max(1, e))).bit_length() - 4)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, bias: torch.Tensor | None = None,
                 activation: str = "identity", store_z: bool = False, mask: torch.Tensor | None = None,
                 z: torch.Tensor | None = None, grad_of_act: bool = False, tile: Tile | None = None):
    """``y[rows of e] = act(x[rows of e] @ w[e] + bias[e]) * mask`` for every expert e.

    ``counts [E]`` int32 on ``x``'s device. ``w`` may be any strided view
    (``w2.transpose(1, 2)`` gives the transposed weights without a copy). With
    ``store_z`` also returns the pre-activation. With ``grad_of_act``:
    ``y = (x @ w[e]) * mask * act'(z)`` (no bias). ``tile`` forces a tile
    (otherwise :data:`FORWARD` picks one).
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

    def launch(t: Tile) -> None:
        grid = ((triton.cdiv(m, t.block_m) + e) * triton.cdiv(n, t.block_n),)
        _grouped_gemm_kernel[grid](
            x, w, bias if bias is not None else dummy, y, z if z is not None else dummy,
            mask if mask is not None else dummy, counts,
            m, n, k, e,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
            bias.stride(0) if bias is not None else 0, y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, ACT=act_code(activation), STORE_Z=store_z,
            GRAD_OF_ACT=grad_of_act, HAS_MASK=mask is not None, E_P2=next_pow2(e), GROUP_M=GROUP_M,
            PRECISION=input_precision(x.dtype), **t.launch_kwargs())

    with on_device(x):
        if tile is not None:
            launch(tile)
        else:
            FORWARD.run((n, k, _m_bucket(m, e), x.dtype), x.dtype, x.device, m // e, launch)
    return (y, z) if store_z else y


@triton.jit(do_not_specialize=["M", "E", "CHUNK", "SLOTS"])
def _grouped_wgrad_kernel(
        x_ptr, dy_ptr, dw_ptr, db_ptr, ws_ptr, wsb_ptr, counts_ptr,
        M, K, N, E, CHUNK, SLOTS,
        stride_xm, stride_xk, stride_dym, stride_dyn, stride_dwe, stride_dwk, stride_dwn, stride_dbe,
        HAS_DB: tl.constexpr, E_P2: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # Row chunk slowest, so the programs running at once share one chunk's rows of x and dy.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_kn = tl.cdiv(K, BLOCK_K) * tiles_n
    chunk = pid // tiles_kn
    pid_k = (pid % tiles_kn) // tiles_n
    pid_n = pid % tiles_n
    e, t, row_e, count, n_chunks, split_before, valid = _locate_tile(counts_ptr, chunk, E, E_P2, CHUNK)
    if valid:
        start = row_e + t * CHUNK
        stop = tl.minimum(tl.minimum(start + CHUNK, row_e + count), M)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = rk < K
        n_ok = rn < N
        first_k = pid_k == 0
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(start, stop, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < stop
            xt = tl.load(x_ptr + rm[None, :].to(tl.int64) * stride_xm + rk[:, None] * stride_xk,
                         mask=k_ok[:, None] & m_ok[None, :], other=0.0)           # [BLOCK_K, BLOCK_M] = x^T
            g = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dym + rn[None, :] * stride_dyn,
                        mask=m_ok[:, None] & n_ok[None, :], other=0.0)             # [BLOCK_M, BLOCK_N]
            acc = tl.dot(xt, g, acc, input_precision=PRECISION)
            if HAS_DB:
                if first_k:
                    dbias += tl.sum(g.to(tl.float32), 0)
        kn_ok = k_ok[:, None] & n_ok[None, :]
        if n_chunks == 1:
            tl.store(dw_ptr + e.to(tl.int64) * stride_dwe + rk[:, None] * stride_dwk + rn[None, :] * stride_dwn,
                     acc.to(dw_ptr.dtype.element_ty), mask=kn_ok)
            if HAS_DB:
                tl.store(db_ptr + e.to(tl.int64) * stride_dbe + rn, dbias.to(db_ptr.dtype.element_ty),
                         mask=n_ok & first_k)
        else:
            slot = split_before + t
            if slot < SLOTS:  # always, for counts that sum to M
                tl.store(ws_ptr + slot.to(tl.int64) * K * N + rk[:, None] * N + rn[None, :], acc, mask=kn_ok)
                if HAS_DB:
                    tl.store(wsb_ptr + slot.to(tl.int64) * N + rn, dbias, mask=n_ok & first_k)


@triton.jit(do_not_specialize=["E", "CHUNK", "SLOTS"])
def _reduce_chunks(ws_ptr, out_ptr, counts_ptr, E, CHUNK, SLOTS, SIZE, stride_oe,
                   E_P2: tl.constexpr, BLOCK: tl.constexpr):
    """``out[e] = sum of e's partial sums`` for a split expert, zeros for an expert without rows."""
    e = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < SIZE
    lanes = tl.arange(0, E_P2)
    c = tl.maximum(tl.load(counts_ptr + lanes, mask=lanes < E, other=0).to(tl.int32), 0)
    tiles = (c + CHUNK - 1) // CHUNK
    n_chunks = tl.sum(tl.where(lanes == e, tiles, 0), 0)
    slot0 = tl.sum(tl.where((lanes < e) & (tiles > 1), tiles, 0), 0)
    dst = out_ptr + e.to(tl.int64) * stride_oe + offs
    if n_chunks == 0:
        tl.store(dst, tl.zeros((BLOCK,), dtype=tl.float32).to(out_ptr.dtype.element_ty), mask=ok)
    elif n_chunks > 1:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        src = ws_ptr + slot0.to(tl.int64) * SIZE + offs
        for _ in range(tl.minimum(n_chunks, SLOTS - slot0)):
            acc += tl.load(src, mask=ok, other=0.0)
            src += SIZE
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill (a small number for the interpreter, so tests split experts)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def chunk_rows(m: int, k: int, n: int, device: torch.device) -> int:
    """Rows per weight-gradient chunk: about ``WAVES`` waves of programs over the SMs however skewed the
    routing (a group of ``m`` rows alone gives ``m / chunk`` chunks of ``k x n`` tiles each), within the
    workspace budget (the split chunks number at most ``2 m / chunk``)."""
    tiles_kn = triton.cdiv(k, 64) * triton.cdiv(n, 128)
    target = max(1, triton.cdiv(WAVES * _sm_count(device), tiles_kn))
    slots = max(1, WORKSPACE_BYTES // (4 * k * n))
    rows = max(triton.cdiv(m, target), triton.cdiv(2 * m, slots), 1)
    return triton.cdiv(rows, CHUNK_ROWS) * CHUNK_ROWS


def grouped_wgrad(x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor, num_experts: int,
                  with_bias: bool = True, dtype: torch.dtype | None = None, tile: Tile | None = None,
                  chunk: int | None = None):
    """``dw[e] = x_e^T @ dy_e`` ``[E, K, N]`` and ``db[e] = sum_rows dy_e`` ``[E, N]`` (experts without rows: 0).

    ``chunk``: rows per program (default :func:`chunk_rows`); ``tile`` forces a tile.
    """
    m, k = x.shape
    n = dy.shape[1]
    e = num_experts
    dtype = dtype or x.dtype
    dw = x.new_empty(e, k, n, dtype=dtype)
    db = x.new_empty(e, n, dtype=dtype) if with_bias else None
    chunk = chunk or chunk_rows(m, k, n, x.device)
    slots = 2 * m // chunk        # split experts have c > chunk rows and ceil(c / chunk) < 2 c / chunk chunks
    ws = x.new_empty(max(1, slots * k * n), dtype=torch.float32)
    wsb = x.new_empty(max(1, slots * n), dtype=torch.float32)
    e_p2 = next_pow2(e)

    def launch(t: Tile) -> None:
        grid = ((triton.cdiv(m, chunk) + e) * triton.cdiv(k, t.block_k) * triton.cdiv(n, t.block_n),)
        _grouped_wgrad_kernel[grid](
            x, dy, dw, db if db is not None else dw, ws, wsb, counts,
            m, k, n, e, chunk, slots,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
            db.stride(0) if db is not None else 0,
            HAS_DB=with_bias, E_P2=e_p2, PRECISION=input_precision(x.dtype), **t.launch_kwargs())

    with on_device(x):
        if tile is not None:
            launch(tile)
        else:
            WGRAD.run((k, n, _m_bucket(chunk, 1), x.dtype), x.dtype, x.device, chunk, launch)
        block = 1024
        for out, size in ((dw, k * n), (db, n)):
            if out is not None:
                _reduce_chunks[(e, triton.cdiv(size, block))](
                    ws if out is dw else wsb, out, counts, e, chunk, slots, size, out.stride(0),
                    E_P2=e_p2, BLOCK=block)
    return dw, db
