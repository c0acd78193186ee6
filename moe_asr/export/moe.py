"""MoE layers for ONNX: only the k selected experts run per token, never all of them.

Each ``MoEFeedForward`` of a model is replaced (in a copy) by ``SparseMoE``,
which exports with standard ONNX ops: the router's routing (TopK and a
softmax over the k), then per expert a NonZero + Gather of the tokens routed
to it, its FFN on those rows only (MatMul on that expert's own weight
initializer, stored ``[in, out]``) and a ScatterND-add back. Each token runs
through k experts, not E.

ONNX Runtime's contrib node ``com.microsoft::MoE`` computes the same layer in
one node, but its CPU kernel was slower than these standard ops on this
machine at every row count measured (16 to 1,600 rows, d 256, FFN 2048, 8
experts top-2: docs/benchmarks.md), and its int8 twin ``QMoE`` likewise; the
standard form also quantizes with ONNX Runtime's dynamic int8 quantizer,
experts included (``moe_asr.export.quantize``). A router must give
``onnx_logits`` (its routing is their top-k softmaxed over the k) or
``onnx_routing``; one with neither is refused by name. A dense layer (one
expert) is an ordinary FFN.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from moe_asr.moe.layer import MoEFeedForward
from moe_asr.moe.router import Router, Routing, top_k_softmax
from moe_asr_kernels.activations import activation as get_activation


class ExpertFFN(nn.Module):
    """One expert's FFN with its weights as ``[in, out]`` buffers: each exports as the initializer a
    MatMul reads directly (no per-call Gather or Transpose of the stacked weights)."""

    def __init__(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str) -> None:
        super().__init__()
        self.register_buffer("w1", w1.detach().contiguous().clone())
        self.register_buffer("b1", b1.detach().clone())
        self.register_buffer("w2", w2.detach().contiguous().clone())
        self.register_buffer("b2", b2.detach().clone())
        self.act = get_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x @ self.w1 + self.b1) @ self.w2 + self.b2


def _probe_routing(router: Router, d_model: int, like: Tensor) -> bool:
    """Whether the router gives ``onnx_logits`` (True) or only ``onnx_routing`` (False); a router with
    neither raises its ``RouterExportError`` here, naming itself."""
    probe = like.new_zeros(1, d_model)
    with torch.no_grad():
        if router.eval().onnx_logits(probe) is not None:
            return True
        router.onnx_routing(probe)
    return False


class SparseMoE(nn.Module):
    """An ``MoEFeedForward`` for export: same weights, same outputs, padding rows set to 0."""

    def __init__(self, layer: MoEFeedForward) -> None:
        super().__init__()
        experts = layer.experts
        if experts.ep_size != 1:
            raise ValueError("export needs every expert of a layer; this one holds an expert-parallel share")
        self.router = layer.router
        self.top_k = 1 if layer.router is None else layer.router.top_k
        d_model = experts.w1.shape[1]
        self.by_logits = layer.router is not None and _probe_routing(layer.router, d_model, experts.w1)
        self.experts = nn.ModuleList(
            ExpertFFN(experts.w1[e], experts.b1[e], experts.w2[e], experts.b2[e], experts.activation_name)
            for e in range(experts.w1.shape[0]))

    def routing(self, rows: Tensor) -> Routing:
        if self.by_logits:
            return top_k_softmax(self.router.onnx_logits(rows), self.top_k)
        return self.router.onnx_routing(rows)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """``x [..., d]``; ``valid [...]`` marks real tokens (the others give 0, as in the eager layer)."""
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        y = self.experts[0](rows) if self.router is None else self._routed(rows, self.routing(rows))
        y = y.view(shape)
        return y if valid is None else y * valid.unsqueeze(-1).to(y.dtype)

    def _routed(self, x: Tensor, routing: Routing) -> Tensor:
        """Each expert on only the tokens ``routing`` sends it, weighted and summed. The loop over the
        experts unrolls into the graph; each expert gathers its tokens (NonZero + Gather), so the FLOPs
        are those of k experts per token whatever E, and the results are added back (ScatterND)."""
        chosen, weights = routing.experts, routing.weights.to(x.dtype)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            h = expert(x[token]) * weights[token, slot].unsqueeze(-1)
            y = y.index_put((token,), h, accumulate=True)
        return y


def sparse_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every ``MoEFeedForward`` replaced by ``SparseMoE``."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoEFeedForward):
                setattr(parent, name, SparseMoE(child))
    return model
