"""Grouped expert FFN, permute and unpermute in plain torch: the path used without a GPU.

The per-expert loop pays a handful of small ops per expert; at streaming sizes
(16 tokens, 8 experts: 2 to 6 rows per expert) that overhead, not arithmetic,
is the cost. Here, when decoding, contiguous runs of experts are padded into one
batched matmul (``baddbmm`` over ``[n, C, d]``), and large groups run unpadded one
by one; a small cost model picks the grouping from the per-expert counts (known on
the host, since this is the CPU path). In training every expert runs unpadded on
its own rows: the padding's gathers and their backwards cost more than they save.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import ACTIVATIONS

# Rough machine constants for the cost model (a 2-core 2.8 GHz AVX-512 Xeon,
# fp32, measured with d=256, f=1024). They only steer the choice between
# padding experts into one batched matmul and running them one by one; the
# result is the same either way.
OP_SECONDS = 1.5e-5          # fixed cost of one op of a separate expert (dispatch, thread wake-up)
FLOPS = 1e11                 # matmul throughput once rows are many
WEIGHT_BYTES_PER_S = 1.4e10  # an expert's weights through a small-M matmul (read + pack)
SMALL_ROWS = 64              # below this, one expert's own matmul runs this much slower than
SMALL_PENALTY = 1.25         # the same rows inside a batched one
SINGLE_OPS = 4               # ops of an unpadded expert: slice, addmm, act, addmm
PADDED_OPS = 9               # ops of a padded run: positions, pad, 2 x baddbmm, act, gather, ...


def plan_segments(counts: list[int], d_model: int, d_ff: int, elem_bytes: int = 4
                  ) -> list[tuple[int, int, int]]:
    """Group experts into runs ``(first, last + 1, C)``, each run one batched matmul padded to C rows.

    An expert costs about ``max(rows * flops_per_row, weight_read)``: with few
    rows, padding is nearly free (the weights must be read anyway) while each
    separate matmul pays its own overhead; with many rows, padding costs real
    arithmetic. Left to right, an expert joins the open run when its marginal
    cost there (its own padded rows plus the extra padding it forces on the
    run) is below its cost alone; a closed run is kept as one padded matmul
    only if that beats running its experts one by one. Experts without rows
    close the open run (they are not read for nothing).
    """
    flop_row = 4.0 * d_model * d_ff / FLOPS
    weight = 2.0 * d_model * d_ff * elem_bytes / WEIGHT_BYTES_PER_S

    def unit(c: int) -> float:  # one expert with c rows: bound by compute or by reading its weights
        return max(c * flop_row, weight)

    def single(c: int) -> float:
        return SINGLE_OPS * OP_SECONDS + unit(c) * (SMALL_PENALTY if c < SMALL_ROWS else 1.0)

    segments: list[tuple[int, int, int]] = []
    run: list[int] = []  # counts of the open run
    first = cap = 0

    def close() -> None:
        if len(run) > 1 and PADDED_OPS * OP_SECONDS + len(run) * unit(cap) < sum(map(single, run)):
            segments.append((first, first + len(run), cap))
        else:
            segments.extend((first + i, first + i + 1, c) for i, c in enumerate(run))

    for e, c in enumerate(counts):
        if c == 0:
            close()
            run = []
            continue
        if run:
            merged = max(cap, c)
            if unit(merged) + len(run) * (unit(merged) - unit(cap)) <= single(c):
                run.append(c)
                cap = merged
                continue
            close()
        run, first, cap = [c], e, c
    close()
    return segments


def _act(name: str, x: Tensor, inplace: bool) -> Tensor:
    if inplace and name in ("swish", "silu"):
        return F.silu(x, inplace=True)
    if inplace and name == "relu":
        return F.relu(x, inplace=True)
    return ACTIVATIONS[name](x)


def grouped_ffn(rows: Tensor, counts: Tensor | list[int], w1: Tensor, b1: Tensor, w2: Tensor,
                b2: Tensor, activation: str = "swish", dropout: float = 0.0,
                training: bool = False) -> Tensor:
    """Expert FFNs on expert-sorted ``rows [M, d]`` (``counts[e]`` rows for expert e) -> ``[M, d]``.

    Differentiable with ordinary autograd (every op is a torch op).
    """
    counts = counts.tolist() if isinstance(counts, Tensor) else list(counts)
    m, d = rows.shape
    if sum(counts) != m:
        raise ValueError(f"counts sum to {sum(counts)} but there are {m} rows")
    if m == 0:
        # No rows for these experts, but still a gradient (zeros) for each weight: under ZeRO every rank of
        # an expert-data-parallel group must reduce the same buckets, and a weight whose .grad stays None
        # is left out of them on this rank only (a hang or wrong sums on the others).
        return rows.new_zeros(0, w2.shape[-1]) + sum(t.sum() for t in (rows, w1, b1, w2, b2)) * 0
    inplace = not (torch.is_grad_enabled() and (rows.requires_grad or w1.requires_grad))
    p = dropout if training else 0.0
    # Padding pays only without autograd (decoding): in training, a padded run's index_copy, gather
    # and their backwards cost more than its one baddbmm saves, so every expert with rows runs alone.
    segments = (plan_segments(counts, d, w1.shape[-1], rows.element_size()) if inplace
                else [(e, e + 1, c) for e, c in enumerate(counts) if c])
    # One split per tensor rather than a slice per segment: the backward of a split is one cat,
    # that of each slice a zero-filled tensor of the whole size (rows or weights) per segment.
    seg_rows = rows.split([sum(counts[e0:e1]) for e0, e1, _ in segments])
    bounds = sorted({0, len(counts), *(e for e0, e1, _ in segments for e in (e0, e1))})
    piece = {e0: i for i, e0 in enumerate(bounds[:-1])}  # first expert -> index of its piece
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    w1s, b1s, w2s, b2s = (w.split(sizes) for w in (w1, b1, w2, b2))
    outs = [_run(x, counts[e0:e1], cap, w1s[piece[e0]], b1s[piece[e0]], w2s[piece[e0]], b2s[piece[e0]],
                 activation, p, inplace)
            for x, (e0, e1, cap) in zip(seg_rows, segments)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _run(x: Tensor, counts: list[int], cap: int, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
         activation: str, p: float, inplace: bool) -> Tensor:
    """A run of experts on their contiguous rows ``x``; padded to ``cap`` rows each when uneven."""
    n = len(counts)
    if n == 1:
        h = _act(activation, torch.addmm(b1.squeeze(0), x, w1.squeeze(0)), inplace)
        h = F.dropout(h, p, True) if p > 0 else h
        return torch.addmm(b2.squeeze(0), h, w2.squeeze(0))
    d = x.shape[1]
    even = all(c == cap for c in counts)
    if even:
        xp = x.view(n, cap, d)
    else:
        shift = torch.tensor([e * cap - s for e, s in enumerate(_starts(counts))])
        pos = torch.arange(x.shape[0]) + shift.repeat_interleave(torch.tensor(counts), output_size=x.shape[0])
        pos = pos.to(x.device)
        xp = x.new_zeros(n * cap, d).index_copy(0, pos, x).view(n, cap, d)
    h = _act(activation, torch.baddbmm(b1.unsqueeze(1), xp, w1), inplace)
    h = F.dropout(h, p, True) if p > 0 else h
    y = torch.baddbmm(b2.unsqueeze(1), h, w2).view(n * cap, -1)
    return y if even else y.index_select(0, pos)


def _starts(counts: list[int]) -> list[int]:
    out, s = [], 0
    for c in counts:
        out.append(s)
        s += c
    return out


def inverse_permutation(order: Tensor) -> Tensor:
    """``inverse`` with ``inverse[order[i]] = i``: where each element of a permutation went."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def sort_by_expert(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of the flat (token, slot) assignments of ``experts [N, k]``.

    Returns ``order`` (flat assignment of each sorted row), ``inverse`` (sorted
    row of each flat assignment) and ``counts [E]``.
    """
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)
    return order, inverse_permutation(order), torch.bincount(flat, minlength=num_experts)


def permute(x: Tensor, tokens: Tensor) -> Tensor:
    """Rows of ``x`` in expert order (``tokens[i]`` is the source token of sorted row i)."""
    return x.index_select(0, tokens)


def unpermute(rows: Tensor, inverse: Tensor, weights: Tensor) -> Tensor:
    """``out[n] = sum_j weights[n, j] * rows[inverse[n*k + j]]``: ``[N*k, d] -> [N, d]``."""
    n, k = weights.shape
    gathered = rows.index_select(0, inverse).view(n, k, rows.shape[-1])
    return torch.bmm(weights.to(rows.dtype).unsqueeze(1), gathered).squeeze(1)


def moe_ffn_sorted(x: Tensor, experts: Tensor, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                   b2: Tensor, activation: str = "swish", dropout: float = 0.0, training: bool = False) -> Tensor:
    """The whole local MoE with each expert unpadded on its sorted rows (decoding: ``6 + 4 x experts with rows`` ops).

    The (token, slot) assignments are sorted by expert and the tokens gathered once; each expert
    then runs ``addmm -> act -> addmm`` on its contiguous rows; the rows are scaled by their router
    weights and summed back into their tokens by one ``index_add``. No padding (no FLOP is spent on
    an empty slot, whatever the counts) and no per-expert ``nonzero``/gather/``index_add`` as in
    WeNet's loop. A token's k contributions are added in expert order, as the loop adds them, and
    each expert sees its rows in token order, as in the loop: the result is the loop's exactly, and
    in training so are the dropout draws (one per expert with rows, in expert order).

    Without gradients (decoding) the ops work in place: the second ``addmm`` writes straight into
    one ``[N*k, d]`` buffer. With them, the weights are unbound once per tensor (one stack in the
    backward, where indexing each expert would fill a zero tensor of the whole stack per expert).
    """
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    tokens = order // k
    rows = x.index_select(0, tokens)
    scale = weights.reshape(-1).index_select(0, order).to(x.dtype).unsqueeze(1)
    rate = dropout if training else 0.0
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w1, b1, w2, b2))):
        out = x.new_empty(n * k, w2.shape[-1])
        start = 0
        for e, c in enumerate(counts):
            if c:
                h = _act(activation, torch.addmm(b1[e], rows[start:start + c], w1[e]), True)
                h = F.dropout(h, rate, True, inplace=True) if rate > 0 else h
                torch.addmm(b2[e], h, w2[e], out=out[start:start + c])
                start += c
        return x.new_zeros(n, out.shape[1]).index_add_(0, tokens, out.mul_(scale))
    if n == 0:  # still a (zero) gradient for every weight: see grouped_ffn
        return x.new_zeros(0, w2.shape[-1]) + sum(t.sum() for t in (x, weights, w1, b1, w2, b2)) * 0
    w1s, b1s, w2s, b2s = (t.unbind(0) for t in (w1, b1, w2, b2))
    outs = []
    for e, part in enumerate(rows.split(counts)):
        if counts[e]:
            h = _act(activation, torch.addmm(b1s[e], part, w1s[e]), False)
            h = F.dropout(h, rate, True) if rate > 0 else h
            outs.append(torch.addmm(b2s[e], h, w2s[e]))
    return x.new_zeros(n, w2.shape[-1]).index_add(0, tokens, torch.cat(outs) * scale)


SMALL_ASSIGNMENTS = 512  # up to this many (token, slot) pairs, moe_ffn_small plans on the host


def moe_ffn_small(x: Tensor, experts: Tensor, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                  b2: Tensor, activation: str = "swish", dropout: float = 0.0,
                  training: bool = False) -> Tensor | None:
    """The whole local MoE for a few tokens (streaming chunks), in about 20 torch ops.

    When the assignments are few and :func:`plan_segments` makes one padded
    run of them, there is no sort: each (token, slot) gets its padded slot
    ``(e - first) * C + rank`` on the host, the tokens are gathered straight
    into the padded ``[n, C, d]`` input (empty slots read an appended zero
    row), and the combine gathers the k outputs of each token from the padded
    output and sums them with the router weights in one ``bmm``. Returns None
    when that does not apply (the caller takes the general path). Differentiable.
    """
    n, k = experts.shape
    if n * k > SMALL_ASSIGNMENTS or n == 0:
        return None
    num_experts, d, d_ff = w1.shape
    flat = experts.reshape(-1).tolist()
    counts = [0] * num_experts
    rank = []
    for e in flat:
        rank.append(counts[e])
        counts[e] += 1
    segments = plan_segments(counts, d, d_ff, x.element_size())
    if len(segments) != 1:
        return None
    first, last, cap = segments[0]
    ne = last - first
    dst = [(e - first) * cap + r for e, r in zip(flat, rank)]   # padded slot of each assignment
    src = [n] * (ne * cap)                                      # token of each padded slot (n: zero row)
    for a, slot in enumerate(dst):
        src[slot] = a // k
    index = torch.tensor(dst + src, device=x.device)
    x_ext = torch.cat([x, x.new_zeros(1, d)])
    xp = x_ext.index_select(0, index[n * k:]).view(ne, cap, d)
    inplace = not (torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad))
    h = _act(activation, torch.baddbmm(b1[first:last].unsqueeze(1), xp, w1[first:last]), inplace)
    if training and dropout > 0:
        h = F.dropout(h, dropout, True)
    y = torch.baddbmm(b2[first:last].unsqueeze(1), h, w2[first:last]).view(ne * cap, -1)
    picked = y.index_select(0, index[:n * k]).view(n, k, -1)
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), picked).squeeze(1)
