"""MoE layers for ONNX: only the k selected experts run per token, never all of them.

Each ``MoEFeedForward`` of a model is replaced (in a copy) by ``SparseMoE``.
Where the layer's router gives ``onnx_logits`` (logits whose top-k, softmaxed
over the k, is its routing: the ``topk`` router's gate), the layer exports as
one ONNX Runtime contrib node ``com.microsoft::MoE``, which takes the top-k of
the logits, softmaxes over those k (``normalize_routing_weights=1``) and runs
each token through its k experts only. The contrib node supports ``relu``,
``silu`` and ``identity`` exactly as we compute them; its ``gelu`` is an
approximation (2e-4 off the erf form). A ``gelu`` layer, or a router with only
``onnx_routing``, exports with standard ops instead: the router's own routing,
then per expert a NonZero + Gather of the tokens routed to it, its FFN on
those rows only and a ScatterND-add back, still sparse (each token runs
through k experts, not E). A router with neither is refused by name. A dense
layer (one expert) is an ordinary FFN.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from moe_asr.moe.layer import MoEFeedForward
from moe_asr.moe.router import Routing, top_k_softmax
from moe_asr_kernels.activations import activation as get_activation

CONTRIB_DOMAIN = "com.microsoft"
# Our activation names -> the contrib node's activation_type, where it computes exactly what we do.
CONTRIB_ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "identity": "identity"}


class _ContribMoE(torch.autograd.Function):
    """Eager: the layer's own computation (so tracing sees the true values); ONNX: one MoE node."""

    @staticmethod
    def forward(ctx, x: Tensor, logits: Tensor, fc1: Tensor, b1: Tensor, fc2: Tensor, b2: Tensor,
                k: int, activation: str) -> Tensor:
        return _routed_experts(x, top_k_softmax(logits, k), fc1, b1, fc2, b2, activation)

    @staticmethod
    def symbolic(g, x, logits, fc1, b1, fc2, b2, k: int, activation: str):
        out = g.op(f"{CONTRIB_DOMAIN}::MoE", x, logits, fc1, b1, fc2, b2, k_i=k,
                   activation_type_s=CONTRIB_ACTIVATIONS[activation], normalize_routing_weights_i=1)
        out.setType(x.type())
        return out


def _routed_experts(x: Tensor, routing: Routing, fc1: Tensor, b1: Tensor, fc2: Tensor, b2: Tensor,
                    activation: str) -> Tensor:
    """Each expert on only the tokens ``routing`` sends it, weighted and summed.

    ``fc1 [E, f, d]``, ``fc2 [E, d, f]`` (the contrib node's layout). The loop
    over the E experts unrolls into the graph; each expert gathers the tokens
    routed to it (NonZero + Gather), so the FLOPs are those of k experts per
    token whatever E, and the results are added back in place (ScatterND).
    """
    experts, weights = routing.experts, routing.weights.to(x.dtype)
    act = get_activation(activation)
    y = torch.zeros_like(x)
    for e in range(fc1.shape[0]):
        token, slot = (experts == e).nonzero(as_tuple=True)
        h = act(x[token] @ fc1[e].t() + b1[e]) @ fc2[e].t() + b2[e]
        y = y.index_put((token,), h * weights[token, slot].unsqueeze(-1), accumulate=True)
    return y


class SparseMoE(nn.Module):
    """An ``MoEFeedForward`` for export: same weights, same outputs, padding rows set to 0."""

    def __init__(self, layer: MoEFeedForward) -> None:
        super().__init__()
        experts = layer.experts
        if experts.ep_size != 1:
            raise ValueError("export needs every expert of a layer; this one holds an expert-parallel share")
        self.activation = experts.activation_name
        self.router = layer.router
        self.top_k = 1 if layer.router is None else layer.router.top_k
        # Asked once, on a probe row: the contrib node needs the router's logits; otherwise the
        # standard-op path needs its routing (a router with neither is refused here, by name).
        self.contrib_logits = False
        if layer.router is not None:
            probe = experts.w1.new_zeros(1, experts.w1.shape[1])
            with torch.no_grad():
                self.contrib_logits = layer.router.eval().onnx_logits(probe) is not None
                if not self.contrib_logits:
                    layer.router.onnx_routing(probe)
        # The contrib node's layout: fc1 [E, f, d], fc2 [E, d, f].
        self.register_buffer("fc1", experts.w1.detach().transpose(1, 2).contiguous())
        self.register_buffer("b1", experts.b1.detach().clone())
        self.register_buffer("fc2", experts.w2.detach().transpose(1, 2).contiguous())
        self.register_buffer("b2", experts.b2.detach().clone())

    @property
    def uses_contrib_op(self) -> bool:
        return self.contrib_logits and self.activation in CONTRIB_ACTIVATIONS

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """``x [..., d]``; ``valid [...]`` marks real tokens (the others give 0, as in the eager layer)."""
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if self.router is None:
            act = get_activation(self.activation)
            y = act(rows @ self.fc1[0].t() + self.b1[0]) @ self.fc2[0].t() + self.b2[0]
        elif self.uses_contrib_op:
            y = _ContribMoE.apply(rows, self.router.onnx_logits(rows), self.fc1, self.b1, self.fc2, self.b2,
                                  self.top_k, self.activation)
        else:
            y = _routed_experts(rows, self.router.onnx_routing(rows), self.fc1, self.b1, self.fc2, self.b2,
                                self.activation)
        y = y.view(shape)
        return y if valid is None else y * valid.unsqueeze(-1).to(y.dtype)


def sparse_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every ``MoEFeedForward`` replaced by ``SparseMoE``."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoEFeedForward):
                setattr(parent, name, SparseMoE(child))
    return model
