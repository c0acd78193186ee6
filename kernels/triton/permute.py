"""Permute: routing indices -> expert-sorted order, per-expert counts, and the row gather.

A stable counting sort in two launches, with no host sync:
1. ``_block_histogram``: each program counts the expert ids in its block of
   ``BLOCK`` assignments (a one-hot ``[BLOCK, E]`` summed over rows).
2. torch on the device: exclusive prefix sums over blocks (where each block's
   rows of an expert start within that expert) and over experts (where each
   expert starts).
3. ``_block_scatter``: each assignment's sorted position is its expert's start
   + its block's base for that expert + its rank among equal ids in the block
   (an exclusive cumsum of the one-hot). Writes ``order[pos] = a`` and
   ``inverse[a] = pos``.

``gather_rows`` copies ``x[order[i] // k]`` to row i (the permute proper).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_pow2, on_device

BLOCK = 128


@triton.jit
def _block_histogram(ids_ptr, hist_ptr, A, E_P2: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < A, other=-1)
    lanes = tl.arange(0, E_P2)
    onehot = (ids[:, None] == lanes[None, :]).to(tl.int32)
    tl.store(hist_ptr + b * E_P2 + lanes, tl.sum(onehot, 0))


@triton.jit
def _block_scatter(ids_ptr, base_ptr, start_ptr, order_ptr, inverse_ptr, A,
                   E_P2: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    ok = offs < A
    ids = tl.load(ids_ptr + offs, mask=ok, other=-1)
    lanes = tl.arange(0, E_P2)
    onehot = (ids[:, None] == lanes[None, :]).to(tl.int32)
    rank = tl.sum((tl.cumsum(onehot, 0) - onehot) * onehot, 1)        # earlier equal ids in the block
    base = tl.load(base_ptr + b * E_P2 + lanes) + tl.load(start_ptr + lanes)
    pos = tl.sum(onehot * base[None, :], 1) + rank
    tl.store(inverse_ptr + offs, pos.to(tl.int64), mask=ok)
    tl.store(order_ptr + pos, offs.to(tl.int64), mask=ok)


def sort_by_expert(experts: torch.Tensor, num_experts: int):
    """``experts [N, k]`` -> ``(order [N*k], inverse [N*k], counts [E])``, all on the device."""
    ids = experts.reshape(-1).to(torch.int32)
    a = ids.numel()
    e_p2 = next_pow2(num_experts)
    blocks = triton.cdiv(a, BLOCK)
    order = torch.empty(a, dtype=torch.long, device=ids.device)
    inverse = torch.empty(a, dtype=torch.long, device=ids.device)
    if a == 0:
        return order, inverse, torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    hist = torch.empty(blocks, e_p2, dtype=torch.int32, device=ids.device)
    with on_device(ids):
        _block_histogram[(blocks,)](ids, hist, a, E_P2=e_p2, BLOCK=BLOCK)
        base = hist.cumsum(0, dtype=torch.int32) - hist                  # rows of each expert in earlier blocks
        counts = hist.sum(0, dtype=torch.int32)
        start = counts.cumsum(0, dtype=torch.int32) - counts             # first row of each expert
        _block_scatter[(blocks,)](ids, base, start, order, inverse, a, E_P2=e_p2, BLOCK=BLOCK)
    return order, inverse, counts[:num_experts].long()


@triton.jit
def _gather_rows(x_ptr, src_ptr, out_ptr, M, D, DIV, stride_x, stride_o,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_ok = rm < M
    src = tl.load(src_ptr + rm, mask=m_ok, other=0) // DIV
    mask = m_ok[:, None] & (rd < D)[None, :]
    v = tl.load(x_ptr + src[:, None] * stride_x + rd[None, :], mask=mask)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_o + rd[None, :], v, mask=mask)


def gather_rows(x: torch.Tensor, src: torch.Tensor, div: int = 1) -> torch.Tensor:
    """``out[i] = x[src[i] // div]`` for ``x [N, D]`` (row-contiguous)."""
    x = x.contiguous()
    m, d = src.numel(), x.shape[1]
    out = x.new_empty(m, d)
    if m == 0:
        return out
    block_d = min(128, next_pow2(d))
    with on_device(x):
        _gather_rows[(triton.cdiv(m, 32), triton.cdiv(d, block_d))](
            x, src, out, m, d, div, x.stride(0), out.stride(0), BLOCK_M=32, BLOCK_D=block_d)
    return out
