"""Routers written the way a user adds one: this file only, named in a config as ``module:Class``.

``HashRouter`` sends each token to the k experts its fixed random hyperplanes
score highest, with equal weights: no parameters, no training signal, and no
logits whose softmax over the k gives its weights, so ONNX Runtime's MoE node
cannot express it but standard ops can. ``OpaqueRouter`` routes the same way
and keeps no ONNX form.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moe_asr.moe.config import MoEConfig
from moe_asr.moe.router import Router, Routing


class OpaqueRouter(Router):
    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__(d_model, cfg)
        planes = torch.randn(d_model, cfg.num_experts, generator=torch.Generator().manual_seed(7))
        self.register_buffer("planes", planes)

    def hash_routing(self, x: Tensor) -> Routing:
        experts = (x.float() @ self.planes).topk(self.top_k, dim=-1).indices
        return Routing(weights=torch.full(experts.shape, 1.0 / self.top_k, device=x.device), experts=experts)

    def forward(self, x: Tensor) -> tuple[Routing, Tensor]:
        routing = self.hash_routing(x)
        self.record(routing.experts, torch.softmax(x.detach().float() @ self.planes, dim=-1))
        return routing, x.new_zeros((), dtype=torch.float32)


class HashRouter(OpaqueRouter):
    def onnx_routing(self, x: Tensor) -> Routing:
        return self.hash_routing(x)
