"""The share of an encoder's time its FFNs take, and the MoE/dense RTF ratio that share bounds.

Two models that differ only in their FFNs: if the dense one spends a share ``s`` of its
encoder time in FFNs and the MoE's FFNs do ``r`` times its FFN FLOPs per token (top_k x
expert units / dense units), an MoE whose every FFN FLOP cost what a dense one costs still
runs at ``1 + s (r - 1)`` times the dense RTF. ``bench.encoder_breakdown`` prints that bound
beside each module kind's share; ``moe-asr bench-rtf`` beside its measured MoE/dense ratios.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from moe_asr.model.u2pp import U2PPModel

KINDS = ("subsampling", "attention", "conv", "ffn")


def encoder_module_kinds(model: U2PPModel) -> list[tuple[nn.Module, str]]:
    """The encoder's modules of each kind in ``KINDS`` (disjoint: none is inside another)."""
    enc = model.encoder
    out: list[tuple[nn.Module, str]] = [(enc.embed, "subsampling")]
    for layer in enc.encoders:
        out.append((layer.self_attn, "attention"))
        for name, kind in (("conv_module", "conv"), ("feed_forward", "ffn"), ("feed_forward_macaron", "ffn")):
            if getattr(layer, name) is not None:
                out.append((getattr(layer, name), kind))
    return out


class ModuleTimers:
    """Seconds per module kind of one model's encoder, accumulated by wrapped forwards (for good)."""

    def __init__(self, model: U2PPModel) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        for module, kind in encoder_module_kinds(model):
            self._wrap(module, kind)

    def _wrap(self, module: nn.Module, kind: str) -> None:
        forward = module.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            self.seconds[kind] += time.perf_counter() - start
            return out

        module.forward = timed


def ffn_flops_per_token(model: U2PPModel) -> int:
    """Multiply-adds per token of one encoder FFN: top_k experts (or the one dense FFN) of d x ffn, twice."""
    ffn = model.encoder.encoders[0].feed_forward
    e, d, f = ffn.experts.w1.shape
    return 2 * d * f * (ffn.router.top_k if ffn.router is not None else 1)


def flop_bound(dense_ffn_share: float, flops_ratio: float) -> float:
    """``1 + s (r - 1)``: the least MoE/dense RTF ratio when an MoE FFN FLOP costs what a dense one does."""
    return 1 + dense_ffn_share * (flops_ratio - 1)


def comparable(dense: U2PPModel, moe: U2PPModel) -> bool:
    """Whether the bound applies: a dense encoder and an MoE one of the same width and depth."""
    a, b = dense.encoder.encoders, moe.encoder.encoders
    return (a[0].feed_forward.router is None and b[0].feed_forward.router is not None and len(a) == len(b)
            and a[0].feed_forward.experts.w1.shape[1] == b[0].feed_forward.experts.w1.shape[1])
