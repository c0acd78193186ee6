"""MoEFeedForward: router + dispatch + experts; with one expert, a dense FFN.

Every feed-forward layer of the model (both macaron FFNs of each Conformer
block, the FFN of every decoder layer) is this module, so a dense baseline is
the same code with ``num_experts=1, top_k=1`` (no router, no dispatch).
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from kernels.deepspeed_moe import DeepSpeedMoE
from moe_asr.moe.dispatch import make_plan, permute, unpermute
from moe_asr.moe.expert_parallel import expert_parallel_grouped
from moe_asr.moe.experts import Experts
from moe_asr.moe.router import Routing, TopKRouter


IMPLS = ("loop", "grouped", "deepspeed")


class MoEFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int = 8, top_k: int = 2,
                 activation: str = "swish", dropout: float = 0.0, impl: str = "grouped",
                 aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0, ep_size: int = 1,
                 ep_rank: int = 0) -> None:
        super().__init__()
        if num_experts == 1 and top_k != 1:
            raise ValueError("a single expert needs top_k=1")
        if impl not in IMPLS:
            raise ValueError(f"unknown MoE impl {impl!r}; expected one of {IMPLS}")
        if impl == "deepspeed" and (ep_size > 1 or z_loss_coef > 0 or top_k != 2 or num_experts == 1):
            # DeepSpeed's top-1 gate weights the expert by its softmax over all
            # experts (WeNet's by 1), so only top-2 computes the same function.
            raise ValueError("impl='deepspeed' is a comparison path: top_k=2, ep_size=1, no z-loss")
        self.impl = impl
        self.router = (TopKRouter(d_model, num_experts, top_k, aux_loss_coef, z_loss_coef)
                       if num_experts > 1 else None)
        self.experts = Experts(num_experts, d_model, d_ff, activation, dropout, ep_size, ep_rank)
        # Auxiliary (load-balancing / z) loss of the last forward; the model adds it to its loss.
        self.aux_loss: Tensor | None = None
        self._deepspeed: DeepSpeedMoE | None = None  # built on first use; owns no parameters
        # Expert-parallel group (set by the training engine): rows go to the ranks owning their experts.
        self.ep_group: dist.ProcessGroup | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def set_expert_parallel_group(self, group: dist.ProcessGroup | None) -> None:
        """Split this layer's experts over ``group`` (its size is the ``ep_size`` the experts were built for)."""
        if group is not None:
            ep_size = self.num_experts // self.experts.num_local
            if self.impl != "grouped" or dist.get_world_size(group) != ep_size:
                raise ValueError(f"expert parallelism needs impl='grouped' and a group of ep_size={ep_size} "
                                 f"ranks; got impl={self.impl!r}, {dist.get_world_size(group)} ranks")
        self.ep_group = group

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """``x [..., d]``; ``valid [...]`` (bool) marks real tokens: padding is not
        routed (no expert compute, no skew of the load statistics) and gets 0."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.router is None:
            return self.experts.ffn(x, 0).view(shape)
        keep = None if valid is None or bool(valid.all()) else valid.reshape(-1).nonzero().squeeze(1)
        tokens = x if keep is None else x.index_select(0, keep)
        if self.impl == "deepspeed":
            y = self._deepspeed_moe(tokens)
        else:
            routing, self.aux_loss = self.router(tokens)
            y = self._loop(tokens, routing) if self.impl == "loop" else self._grouped(tokens, routing)
        if keep is not None:
            y = x.new_zeros(x.shape[0], y.shape[-1]).index_copy(0, keep, y)
        return y.view(shape)

    def _loop(self, x: Tensor, routing: Routing) -> Tensor:
        """WeNet's reference: one pass over the experts, each gathering its own tokens."""
        out = x.new_zeros(x.shape[0], self.experts.w2.shape[-1])
        weights = routing.weights.to(x.dtype)
        for e in range(self.num_experts):
            tokens, slot = (routing.experts == e).nonzero(as_tuple=True)
            if tokens.numel():
                y = self.experts.ffn(x[tokens], e)
                out.index_add_(0, tokens, weights[tokens, slot, None] * y)
        return out

    def _grouped(self, x: Tensor, routing: Routing) -> Tensor:
        """Sort tokens by expert, run all experts in one grouped kernel, combine back.

        Expert parallelism goes between ``permute`` and ``grouped`` (rows in
        expert order + counts per expert out to the owning ranks) and back
        before ``unpermute``.
        """
        if self.ep_group is None:  # all experts local: the kernels may fuse permute/experts/combine
            return self.experts.moe(x, routing.experts, routing.weights)
        plan = make_plan(routing.experts, self.num_experts)
        rows = expert_parallel_grouped(self.experts.grouped, permute(x, plan), plan.counts, self.ep_group)
        return unpermute(rows, plan, routing.weights)

    def _deepspeed_moe(self, x: Tensor) -> Tensor:
        """``deepspeed.moe.layer.MoE`` (dropless) on this layer's router and expert weights."""
        if self._deepspeed is None:
            self._deepspeed = DeepSpeedMoE(self.router.gate, self.experts.ffn, self.num_experts,
                                           self.router.top_k)
        y, l_aux = self._deepspeed(x)
        self.aux_loss = self.router.aux_loss_coef * l_aux.float()
        return y
