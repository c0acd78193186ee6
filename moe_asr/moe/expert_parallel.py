"""Expert parallelism: routed rows travel to the ranks that own their experts, and back.

An expert-parallel group of P ranks splits the E experts of a layer: rank r
holds experts ``[r * E/P, (r + 1) * E/P)``. Every rank routes its own tokens
over all E experts; its expert-sorted rows (``dispatch.permute``) are then
contiguous per destination rank, so one ``all_to_all_single`` with uneven
splits sends each block to its owner (dropless: no capacity, no padding).
A receiving rank gets, from each source, rows grouped by its local experts;
it reorders them expert-major so ``Experts.grouped`` sees one contiguous block
per local expert, and the way back undoes both steps. Both exchanges are
differentiable (the backward of an all-to-all is the all-to-all with the splits
swapped), so expert gradients land on the owning rank and token gradients on
the rank that routed the token.

Only split sizes cross to the host (an all-to-all needs them). Every rank
takes part in every exchange, forward and backward, with zero-row blocks when
it routes no tokens or its experts receive none: a rank that skipped one
backward exchange would pair its next one with a different layer's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from moe_asr_kernels import inverse_permutation

__all__ = ["Exchange", "dispatch", "combine", "expert_parallel_grouped"]


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split ``in_splits`` to the ranks of ``group``; ``out_splits`` come back."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


@dataclass
class Exchange:
    """What the way back needs: the splits of the forward exchange and the expert-major order."""

    group: dist.ProcessGroup
    send_splits: list[int]  # rows this rank sent to each rank
    recv_splits: list[int]  # rows this rank received from each rank
    order: Tensor           # expert-major position -> source-major position of each received row


def dispatch(rows: Tensor, counts: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, Tensor, Exchange]:
    """Send expert-sorted ``rows [M, d]`` (``counts [E]`` per global expert) to the experts' owners.

    Returns the received rows sorted by local expert, their counts per local
    expert ``[E/P]``, and the :class:`Exchange` for :func:`combine`.
    """
    world = dist.get_world_size(group)
    if counts.numel() % world:
        raise ValueError(f"{counts.numel()} experts cannot be split over an expert-parallel group of {world}")
    send = counts.to(torch.int64).reshape(world, -1)  # [P, E_local]: rows for each rank's experts
    recv = torch.empty_like(send)                     # [P, E_local]: rows from each rank for my experts
    dist.all_to_all_single(recv, send, group=group)
    send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
    received = _AllToAll.apply(rows, recv_splits, send_splits, group)
    local = torch.arange(send.shape[1], device=recv.device).repeat(world)
    order = torch.argsort(local.repeat_interleave(recv.flatten()), stable=True)
    return received.index_select(0, order), recv.sum(0), Exchange(group, send_splits, recv_splits, order)


def combine(rows: Tensor, exchange: Exchange) -> Tensor:
    """Expert outputs ``rows`` (in :func:`dispatch`'s order) back to the ranks that routed them."""
    source_major = rows.index_select(0, inverse_permutation(exchange.order))
    return _AllToAll.apply(source_major, exchange.send_splits, exchange.recv_splits, exchange.group)


def expert_parallel_grouped(grouped: Callable[[Tensor, Tensor], Tensor], rows: Tensor, counts: Tensor,
                            group: dist.ProcessGroup) -> Tensor:
    """``grouped(rows, counts)`` over the experts of the whole group: same rows in, same rows out."""
    local_rows, local_counts, exchange = dispatch(rows, counts, group)
    out = grouped(local_rows, local_counts)
    if local_rows.numel() == 0 and local_rows.requires_grad:
        # No rows for this rank's experts: a kernel's empty output may hang on the weights only (or on
        # nothing), cutting the received rows out of the graph. Reattach them (adds 0) so this rank still
        # joins both backward exchanges its peers make.
        out = out + local_rows.sum()
    return combine(out, exchange)
