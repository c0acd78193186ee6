"""MoEFeedForward: router + dispatch + experts; with one expert, a dense FFN.

Every feed-forward layer of the model (both macaron FFNs of each Conformer
block, the FFN of every decoder layer) is this module, so a dense baseline is
the same code with ``num_experts=1, top_k=1`` (no router, no dispatch).
The layer is built with all experts; for expert-parallel training the engine
calls :meth:`MoEFeedForward.shard` to keep one rank's share.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from moe_asr.moe.config import MoEConfig
from moe_asr.moe.dispatch import make_plan, permute, unpermute
from moe_asr.moe.expert_parallel import expert_parallel_grouped
from moe_asr.moe.experts import Experts
from moe_asr.moe.registry import router_class
from moe_asr.moe.router import Router, Routing


class MoEFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig, activation: str = "swish",
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.impl = cfg.impl
        self.router: Router | None = router_class(cfg.router)(d_model, cfg) if cfg.num_experts > 1 else None
        self.experts = Experts(cfg.num_experts, d_model, d_ff, activation, dropout)
        # Auxiliary (load-balancing / z) loss of the last forward; the model adds it to its loss.
        self.aux_loss: Tensor | None = None
        self._deepspeed = None  # impl 'deepspeed': the comparison wrapper, built on first use; owns no parameters
        # Expert-parallel group (set by `shard`): rows go to the ranks owning their experts.
        self.ep_group: dist.ProcessGroup | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def shard(self, group: dist.ProcessGroup | None, rank: int, size: int) -> None:
        """Keep this rank's share of the experts; routed rows then travel over ``group`` (``size`` ranks).

        ``group=None`` only keeps the weights (a layer that cannot run on its own).
        """
        if group is not None and dist.get_world_size(group) != size:
            raise ValueError(f"an expert-parallel group of {dist.get_world_size(group)} ranks for ep_size={size}")
        self.experts.shard(rank, size)
        self.ep_group = group if size > 1 else None

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """``x [..., d]``; ``valid [...]`` (bool) marks real tokens: padding is not
        routed (no expert compute, no skew of the load statistics) and gets 0."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.router is None:
            return self.experts.ffn(x, 0).view(shape)
        if self.experts.ep_size > 1 and self.ep_group is None:
            raise RuntimeError("this layer holds a share of the experts but has no expert-parallel group")
        keep = None if valid is None or bool(valid.all()) else valid.reshape(-1).nonzero().squeeze(1)
        tokens = x if keep is None else x.index_select(0, keep)
        if self.impl == "deepspeed":
            y = self._deepspeed_moe(tokens)
        else:
            routing, self.aux_loss = self.router(tokens)
            y = (self.experts.loop(tokens, routing.experts, routing.weights) if self.impl == "loop"
                 else self._grouped(tokens, routing))
        if keep is not None:
            y = x.new_zeros(x.shape[0], y.shape[-1]).index_copy(0, keep, y)
        return y.view(shape)

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
        """``deepspeed.moe.layer.MoE`` (dropless) on this layer's router and expert weights.

        The only place this package reaches DeepSpeed outside the engine, and only
        when a config asks for ``impl: deepspeed`` (the comparison path).
        """
        if self._deepspeed is None:
            if bool(self.router.choice_bias.any()):
                raise ValueError("impl deepspeed routes by DeepSpeed's own gate, which has no expert bias, and this "
                                 "layer's is not zero: use impl grouped or loop")
            from moe_asr_kernels.deepspeed_moe import DeepSpeedMoE

            self._deepspeed = DeepSpeedMoE(self.router.gate, self.experts.ffn, self.num_experts,
                                           self.router.top_k)
        y, l_aux = self._deepspeed(x)
        self.aux_loss = self.router.aux_loss_coef * l_aux.float()
        return y
