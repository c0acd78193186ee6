"""Per-GPU memory, all-to-all bytes and FLOPs of a training layout, before it runs.

Usage: moe-asr plan conf/paper_moe_1b.yaml --gpus-per-node 8 --nodes 2 --ep-size 8 \\
           --zero-stage 2 --dtype bf16 --frames-per-batch 12000 [--json]

Model states (parameters, gradients, fp32 master weights, Adam moments; expert and non-expert
apart) are what DeepSpeed 0.19.8's ZeRO 0/1/2 holds on the most loaded GPU, exact to the byte
(padding included; tests/engine/test_plan_exact.py and test_eight_ranks.py compare them with real
CPU runs at 2, 4 and 8 ranks). Activations and FLOPs come from one training forward of a probe
utterance (--utt-seconds) on this CPU in the layout's dtype, scaled to the batch's frames. The all-to-all bytes assume uniform routing. See
docs/plan.md for what each number counts and the paper models' table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_asr.model.config import AUTO
from moe_asr.plan import PARTS, Layout, PlanError, plan
from moe_asr.run.config import ConfigError, resolve_vocabulary
from moe_asr.train import load_experiment

GIB = 2 ** 30
LABELS = {"parameters": "parameters", "gradients": "gradients", "master_weights": "fp32 master weights",
          "optimizer_states": "Adam moments (fp32)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as launch/train.py does (VALUE is YAML); repeatable")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="default 8")
    parser.add_argument("--nodes", type=int, default=1, help="default 1")
    parser.add_argument("--ep-size", type=int, help="experts' layout (default: the config's parallel.ep_size)")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2),
                        help="default 2 (or the --ds-config's)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default bf16 (or the --ds-config's)")
    parser.add_argument("--ds-config", metavar="JSON",
                        help="take ZeRO stage, precision, reduce_bucket_size and overlap_comm from this DeepSpeed "
                             "config (default: ds_configs/zero{1,2}_bf16.json's buckets: 2e8 elements, two of them "
                             "at ZeRO 2)")
    parser.add_argument("--frames-per-batch", type=int,
                        help="feature frames in one GPU's batch (default: data.batching.max_frames_in_batch)")
    parser.add_argument("--utt-seconds", type=float, default=12.3,
                        help="the probe utterance's length (LibriSpeech's mean 12.3 s, AISHELL's 4.5 s)")
    parser.add_argument("--tokens-per-second", type=float, default=4.0, help="the probe's targets per second")
    parser.add_argument("--symbol-table", metavar="UNITS_TXT", help="for a config with model.vocab_size: auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _layout(args: argparse.Namespace, ep_size: int, frames: int) -> Layout:
    if args.ds_config is None:
        stage = 2 if args.zero_stage is None else args.zero_stage
        return Layout(args.gpus_per_node, args.nodes, ep_size, stage, args.dtype or "bf16", frames,
                      overlap_comm=stage == 2)
    if args.zero_stage is not None or args.dtype is not None:
        raise PlanError("--ds-config sets the ZeRO stage and the dtype: drop --zero-stage and --dtype")
    try:
        ds = json.loads(Path(args.ds_config).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{args.ds_config}: cannot read the DeepSpeed config: {e}") from None
    return Layout.from_deepspeed(ds, gpus_per_node=args.gpus_per_node, nodes=args.nodes, ep_size=ep_size,
                                 frames_per_batch=frames)


def run(args: argparse.Namespace) -> int:
    try:
        overrides = args.set + ([f"parallel.ep_size={args.ep_size}"] if args.ep_size else [])
        config = load_experiment(args.config, overrides)
        config.model = resolve_vocabulary(config.model, args.symbol_table or config.data.tokenizer.symbol_table)
        if config.model.vocab_size == AUTO:
            raise ConfigError(f"{args.config}: model.vocab_size is auto: pass --symbol-table UNITS_TXT")
        layout = _layout(args, config.parallel.ep_size,
                         args.frames_per_batch or config.data.batching.max_frames_in_batch)
        result = plan(config, layout, args.utt_seconds, args.tokens_per_second)
    except (ConfigError, PlanError) as e:
        print(f"moe-asr plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(report(args.config, result))
    return 0


def _gib(b: float) -> str:
    return f"{b / GIB:9.3f}"


def report(path: str, r: dict) -> str:
    """The plan as text: the most loaded GPU's memory, then communication and compute."""
    c, lay, states = r["config"], r["layout"], r["model_states"]
    lines = [f"{path}: {c['total_params']:,} parameters ({c['expert_params']:,} in experts), "
             f"{c['num_experts']} experts top-{c['top_k']}",
             f"layout: {lay['world']} GPUs ({lay['nodes']} x {lay['gpus_per_node']}), ep_size {lay['ep_size']}, "
             f"ZeRO {lay['zero_stage']}, {lay['dtype']}, {lay['frames_per_batch']} frames per GPU batch",
             f"per GPU (rank {r['rank']}, the most loaded), GiB:   expert  non-expert      total"]
    for part in PARTS:
        e, d = states[part]["expert"], states[part]["dense"]
        lines.append(f"  {LABELS[part]:<28s}{_gib(e)}   {_gib(d)}  {_gib(e + d)}")
    act = r["activations"]
    lines += [f"  {'model states':<28s}{'':22s}{_gib(r['model_states_bytes'])}",
              f"  {'gradient buckets':<28s}{'':22s}{_gib(r['buckets_bytes'])}",
              f"  {'activations (measured)':<28s}{'':22s}{_gib(act['bytes'])}   "
              f"({act['utterances_per_batch']:.2f} x a {act['probe_frames']}-frame probe)",
              f"  {'total':<28s}{'':22s}{_gib(r['total_bytes'])}"]
    a2a = r["all_to_all"]
    kinds: dict[tuple[str, int, int, int], int] = {}
    for name, layer in a2a["layers"].items():
        key = (name.split(".")[0], layer["rows"], layer["forward_bytes"], layer["backward_bytes"])
        kinds[key] = kinds.get(key, 0) + 1
    lines.append(f"all-to-all per step and GPU ({a2a['assumption']}):")
    for (kind, rows, fwd, bwd), n in kinds.items():
        lines.append(f"  {n} {kind} MoE layers, {rows} rows each: {fwd / 2 ** 20:.1f} MiB forward, "
                     f"{bwd / 2 ** 20:.1f} MiB backward per layer")
    lines += [f"  step total {a2a['step_bytes'] / GIB:.3f} GiB",
              f"FLOPs per step and GPU: {r['flops_per_step'] / 1e12:.2f} TFLOP (3 x the probe's forward, scaled)"]
    return "\n".join(lines)
