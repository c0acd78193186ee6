"""Print total and active-per-token parameters of a model config, per component.

Usage: moe-asr model-info conf/paper_moe_1b.yaml [--json]

The model is built on PyTorch's meta device, so even the 1B config costs no
memory or initialisation time. "Active" counts what one token uses: every
non-expert parameter plus top_k of the num_experts experts of each MoE layer.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

from moe_asr.engine.config import ConfigError, load_config, resolve_vocabulary
from moe_asr.model.config import AUTO, ModelConfig
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
    decoder = parts[1]  # left_decoder / right_decoder
    sub = parts[2]
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (its `model` section is used)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--symbol-table", metavar="UNITS_TXT",
                        help="symbol table for a config with model.vocab_size: auto (default: the config's "
                             "data.tokenizer.symbol_table)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    try:
        model = resolve_vocabulary(cfg.model, args.symbol_table or cfg.data.tokenizer.symbol_table)
    except ConfigError as e:
        model, problem = cfg.model, str(e)
    else:
        problem = None if model.vocab_size != AUTO else "model.vocab_size is auto: pass --symbol-table UNITS_TXT"
    if problem:
        print(f"moe-asr model-info: error: {args.config}: {problem}", file=sys.stderr)
        return 2
    info = count_parameters(model)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.config}: {info['moe_layers']} MoE layers, {info['num_experts']} experts, top-{info['top_k']}")
    print(f"  total params   {info['total_params']:>15,d}  ({info['total_params'] / 1e6:.1f}M)")
    print(f"  active / token {info['active_params']:>15,d}  ({info['active_params'] / 1e6:.1f}M)")
    for name, n in info["breakdown"].items():
        print(f"    {name:<24s}{n:>15,d}  {100 * n / info['total_params']:5.1f}%")
    return 0
