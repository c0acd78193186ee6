"""The expert-parallel exchange is exact: an MoE layer split over 2 ranks computes what the whole layer does.

Every rank builds the whole layer and a copy sharded to its half of the experts
(``MoEFeedForward.shard``, as the engine does) and runs the whole layer on the global batch locally as the
reference; the split layers exchange rows with gloo all-to-all. Outputs, token
gradients, router gradients (summed over ranks) and the local experts'
gradients must match, including a rank that routes no tokens and a rank whose
experts receive no tokens.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_asr.moe.config import MoEConfig
from moe_asr.moe.layer import MoEFeedForward

D, F, E, K = 12, 20, 4, 2


def whole_and_part(rank: int, d: int, f: int, e: int, k: int) -> tuple[MoEFeedForward, MoEFeedForward]:
    """A layer (seed 0) and a copy of it sharded to this rank's half of the experts over the 2-rank world."""
    torch.manual_seed(0)
    whole = MoEFeedForward(d, f, MoEConfig(e, k))
    part = MoEFeedForward(d, f, MoEConfig(e, k))
    part.load_state_dict(whole.state_dict())
    part.shard(dist.group.WORLD, rank, 2)
    return whole, part


def _worker(rank: int, port: int, counts: tuple[int, int], starve_rank: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        whole, part = whole_and_part(rank, D, F, E, K)
        g = torch.Generator().manual_seed(1)
        x_all = torch.randn(sum(counts), D, generator=g)
        if starve_rank is not None:  # positive inputs and very negative gate rows: no token picks these experts
            x_all = x_all.abs() + 0.1
            with torch.no_grad():
                for layer in (whole, part):
                    layer.router.gate.weight[starve_rank * 2:(starve_rank + 1) * 2] = -5.0
        w_all = torch.randn(sum(counts), D, generator=g)
        x_all.requires_grad_()
        x_all.grad = None
        (whole(x_all) * w_all).sum().backward()
        y_ref = whole(x_all).detach()
        if starve_rank is not None:
            assert whole.router.tokens_per_expert[starve_rank * 2:(starve_rank + 1) * 2].sum() == 0

        mine = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
        x = x_all.detach()[mine].clone().requires_grad_()
        y = part(x)
        (y * w_all[mine]).sum().backward()

        torch.testing.assert_close(y.detach(), y_ref[mine], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, x_all.grad[mine], rtol=1e-5, atol=1e-6)
        router_grad = part.router.gate.weight.grad.clone()
        dist.all_reduce(router_grad)
        torch.testing.assert_close(router_grad, whole.router.gate.weight.grad, rtol=1e-5, atol=1e-5)
        local = slice(rank * 2, rank * 2 + 2)
        for name in ("w1", "b1", "w2", "b2"):
            param = getattr(part.experts, name)
            grad = param.grad if param.grad is not None else torch.zeros_like(param)  # experts without rows
            torch.testing.assert_close(grad, getattr(whole.experts, name).grad[local], rtol=1e-5, atol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("counts,starve_rank,port", [
    ((13, 8), None, 29521),   # uneven token counts
    ((0, 9), None, 29522),    # rank 0 routes no tokens
    ((7, 6), 1, 29523),       # rank 1's experts receive no tokens
])
def test_split_layer_equals_whole_layer(counts, starve_rank, port):
    mp.spawn(_worker, args=(port, counts, starve_rank), nprocs=2)


def test_expert_parallelism_needs_a_matching_group(one_rank):
    layer = MoEFeedForward(D, F, MoEConfig(E, K))
    with pytest.raises(ValueError, match="expert-parallel group of 1 ranks for ep_size=2"):
        layer.shard(dist.group.WORLD, 0, 2)
