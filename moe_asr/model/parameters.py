"""How many parameters a model config has, in total and active per token, per component.

The model is built on PyTorch's meta device, so even the 1B config costs no
memory or initialisation time. "Active" counts what one token uses: every
non-expert parameter plus top_k of the num_experts experts of each MoE layer.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from moe_asr.model.config import ModelConfig
from moe_asr.model.u2pp import build_model


def _component(name: str) -> str:
    """Group a parameter name into a readable component."""
    parts = name.split(".")
    top = parts[0]
    if top == "ctc":
        return "ctc"
    if ".experts." in f".{name}":
        return f"{top}.experts"
    if ".router." in name:
        return f"{top}.routers"
    if top == "encoder":
        sub = parts[1]
        if sub == "encoders":
            block = parts[3]
            return {"self_attn": "encoder.attention", "conv_module": "encoder.convolution"}.get(block, "encoder.norms")
        return {"embed": "encoder.subsampling", "after_norm": "encoder.norms"}.get(sub, f"encoder.{sub}")
    sub = parts[2]  # parts[1] is left_decoder / right_decoder: both count as the decoder
    if sub == "decoders":
        block = parts[4]
        kind = "attention" if block in ("self_attn", "src_attn") else "norms"
        return f"decoder.{kind}"
    return f"decoder.{'embedding' if sub == 'embed' else 'output'}"


def count_parameters(cfg: ModelConfig) -> dict:
    """Totals and the per-component breakdown for ``cfg`` (a model is built with all its experts)."""
    with torch.device("meta"):
        model = build_model(cfg, load_cmvn=False)
    breakdown: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        breakdown[_component(name)] += p.numel()
    total = sum(breakdown.values())
    inactive = 0
    for layer in model.moe_layers():
        layer_experts = sum(p.numel() for p in layer.experts.parameters())
        inactive += layer_experts - layer_experts * cfg.moe.top_k // layer.num_experts
    return {
        "total_params": total,
        "active_params": total - inactive,
        "moe_layers": len(model.moe_layers()),
        "num_experts": cfg.moe.num_experts,
        "top_k": cfg.moe.top_k,
        "breakdown": dict(sorted(breakdown.items())),
    }
