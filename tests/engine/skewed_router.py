"""A router that loads one rank heavily and leaves others with nothing, named in a config as ``module:Class``.

``SkewedRouter`` is WeNet's learned gate (``TopKRouter``: float32 logits, the
chosen k weighted by a softmax over their plain logits) choosing with a fixed
skew: expert 0 is in every token's top k, so the rank that owns it gets at
least half of all rows at any ``ep_size``; and a forward of fewer than
``STARVE_BELOW`` tokens never chooses the upper half of the experts, so at
``ep_size`` 2, 4 and 8 the last rank(s) of an expert-parallel group whose
batches are all that small receive no rows in that layer. The skew steers the
choice only: the gate's gradient is the plain top-k softmax's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moe_asr.moe.router import Router, Routing, TopKRouter, top_k_softmax

STARVE_BELOW = 12  # tokens in one forward of one rank
FAVOURED = 8.0     # added to expert 0's choice score: far above the gate's logits


class SkewedRouter(TopKRouter):
    # The gate's logits alone are not this routing: no ONNX form (the export then says so).
    onnx_logits = Router.onnx_logits
    onnx_routing = Router.onnx_routing

    def forward(self, x: Tensor) -> tuple[Routing, Tensor]:
        logits = self.logits(x)
        skew = torch.zeros(self.num_experts, device=x.device)
        skew[0] = FAVOURED
        if x.shape[0] < STARVE_BELOW:
            skew[self.num_experts // 2:] = float("-inf")
        routing = top_k_softmax(logits, self.top_k, self.choice_bias + skew)
        if self.training:
            self.record(routing.experts, torch.softmax(logits.detach(), dim=-1))
        return routing, logits.new_zeros(())
