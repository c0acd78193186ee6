"""Print total and active-per-token parameters of a model config, per component.

Usage: moe-asr model-info conf/paper_moe_1b.yaml [--json]

The counting is ``moe_asr.model.parameters.count_parameters`` (on the meta
device: even the 1B config costs no memory). "Active" counts what one token
uses: every non-expert parameter plus top_k of the num_experts experts of each
MoE layer.
"""
from __future__ import annotations

import argparse
import json
import sys

from moe_asr.run.config import ConfigError, load_config, resolve_vocabulary
from moe_asr.model.config import AUTO
from moe_asr.model.parameters import count_parameters


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
