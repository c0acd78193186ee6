"""The ``model.moe`` section: how every feed-forward layer of the model is built and run.

All rules about these values are checked here, once, with the key in the
message; the layer, the engine and the tools trust a constructed ``MoEConfig``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from moe_asr.moe.registry import router_class
from moe_asr.schema import check

Impl = Literal["loop", "grouped", "deepspeed"]
IMPLS: tuple[str, ...] = get_args(Impl)


@dataclass
class MoEConfig:
    """Every feed-forward layer of the model is built from this.

    ``num_experts: 1, top_k: 1`` gives an ordinary dense FFN (no router), so
    dense baselines come from the same code.
    """

    num_experts: int = 8
    top_k: int = 2
    # Which router picks each token's experts: a name in moe_asr.moe.registry.ROUTERS
    # (`topk` is WeNet's gate, the paper's) or a "module:Class" path to a Router subclass.
    router: str = "topk"
    # How the routed tokens reach the experts: `loop` is WeNet's per-expert
    # loop (the reference), `grouped` sorts tokens by expert and runs grouped
    # matmuls (Triton kernel on GPU, batched torch on CPU), `deepspeed` wraps
    # deepspeed.moe.layer.MoE (dropless, same weights) for comparison only:
    # top_k=2, parallel.ep_size=1, no z-loss.
    impl: Impl = "grouped"
    # Optional Switch-style load-balancing loss and router z-loss; the paper uses neither.
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    # Loss-free balancing (DeepSeek-V3): after each optimizer step every expert's routing bias moves
    # by this much toward the mean load (the bias steers which experts are chosen, never their
    # weights). 0: off, the bias stays as loaded (zero for a new model), as in the paper.
    bias_update_rate: float = 0.0

    def __post_init__(self) -> None:
        check(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        check(1 <= self.top_k <= self.num_experts, "top_k",
              f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        check(self.impl in IMPLS, "impl", f"{self.impl!r} is not one of {list(IMPLS)}")
        try:
            router_class(self.router)
        except ValueError as e:
            check(False, "router", str(e))
        check(self.aux_loss_coef >= 0 and self.z_loss_coef >= 0, "aux_loss_coef",
              "loss coefficients must be >= 0")
        check(math.isfinite(self.bias_update_rate) and self.bias_update_rate >= 0, "bias_update_rate",
              f"must be a finite number >= 0, got {self.bias_update_rate}")
        if self.bias_update_rate > 0:
            check(self.num_experts > 1, "bias_update_rate", "needs num_experts > 1 (a dense FFN has no router)")
            check(router_class(self.router).has_choice_bias, "bias_update_rate",
                  f"router {self.router!r} has no expert bias to balance (the topk router has one)")
            check(self.impl != "deepspeed", "bias_update_rate",
                  "impl deepspeed routes by DeepSpeed's own gate, which has no expert bias")
        # DeepSpeed's top-1 gate weights the expert by its softmax over all
        # experts (WeNet's by 1), so only its top-2 computes the same function.
        check(self.impl != "deepspeed" or (self.top_k == 2 and self.z_loss_coef == 0 and self.router == "topk"),
              "impl", "deepspeed is a comparison path: it needs router: topk, top_k: 2 and no z_loss_coef")
