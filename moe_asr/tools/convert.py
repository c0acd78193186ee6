"""Convert checkpoints: DeepSpeed to one file, averaging, dense-to-MoE upcycling, WeNet import.

  moe-asr convert ds-to-pt RUN_DIR|CKPT_DIR [--tag T] [--with-optimizer] -o model.pt
  moe-asr convert average CKPT... | --run RUN_DIR (--best N | --last N) -o avg.pt
  moe-asr convert upcycle dense.pt --config moe.yaml -o moe.pt
  moe-asr convert from-wenet final.pt --train-yaml train.yaml [--cmvn F] [--units F] -o model.pt

Every output is a consolidated model file (weights with every expert, the
config, the tokenizer), written under a temporary name and renamed when
complete; an output path equal to an input is refused. To continue training
from a file at another layout: `launch/train.py --init-from model.pt`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from moe_asr.checkpoint.load import ModelState, save_model

log = logging.getLogger("moe_asr.convert")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="conversion", metavar="CONVERSION", required=True)
    p = sub.add_parser("ds-to-pt", help="a DeepSpeed checkpoint (ZeRO 0/1/2, any ep_size) to one file")
    p.add_argument("path", help="run directory, its checkpoints/ directory, or one checkpoint tag directory")
    p.add_argument("--tag", help="checkpoint tag (default: latest)")
    p.add_argument("--with-optimizer", action="store_true",
                   help="also store the layout-free training state (AdamW moments by parameter, LR schedule, "
                        "counters) for launch/train.py --init-from")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(_convert=_ds_to_pt)

    p = sub.add_parser("average", help="the mean of several checkpoints (WeNet's average_model)")
    p.add_argument("checkpoints", nargs="*", help="model files or checkpoint directories")
    p.add_argument("--run", help="run directory: pick its checkpoints from checkpoints.json")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--best", type=int, metavar="N", help="the N with the lowest CV loss")
    pick.add_argument("--last", type=int, metavar="N", help="the N newest")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(_convert=_average)

    p = sub.add_parser("upcycle", help="a dense model to its MoE counterpart, every expert a copy of the FFN")
    p.add_argument("dense", help="consolidated dense model file (model.moe.num_experts: 1)")
    p.add_argument("--config", required=True, help="experiment YAML of the MoE model")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(_convert=_upcycle)

    p = sub.add_parser("from-wenet", help="a WeNet U2++ Conformer checkpoint (dense or MoE)")
    p.add_argument("checkpoint", help="WeNet's final.pt (a plain state_dict)")
    p.add_argument("--train-yaml", required=True, help="WeNet's train.yaml of that model")
    p.add_argument("--cmvn", help="WeNet's global_cmvn (when the state dict has no CMVN)")
    p.add_argument("--units", help="WeNet's units.txt (default: the one the yaml names)")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(_convert=_from_wenet)


def _ds_to_pt(args: argparse.Namespace) -> tuple[ModelState, dict]:
    from moe_asr.checkpoint.convert import ds_to_pt

    return ds_to_pt(args.path, args.tag, args.with_optimizer)


def _average(args: argparse.Namespace) -> tuple[ModelState, dict]:
    from moe_asr.checkpoint.average import average, run_checkpoints

    if args.run:
        if args.checkpoints or not (args.best or args.last):
            raise ValueError("--run takes --best N or --last N and no checkpoint paths")
        sources = run_checkpoints(args.run, args.best or args.last, "best" if args.best else "last")
    elif args.checkpoints:
        sources = [Path(c) for c in args.checkpoints]
    else:
        raise ValueError("name checkpoints to average, or --run RUN_DIR with --best N or --last N")
    ms = average(sources)
    return ms, {"averaged": [str(s) for s in sources]}


def _upcycle(args: argparse.Namespace) -> tuple[ModelState, dict]:
    from moe_asr.checkpoint.convert import upcycle

    ms = upcycle(args.dense, args.config)
    return ms, {"dense": args.dense, "num_experts": ms.config.model.moe.num_experts,
                "top_k": ms.config.model.moe.top_k}


def _from_wenet(args: argparse.Namespace) -> tuple[ModelState, dict]:
    from moe_asr.checkpoint.wenet import import_wenet

    state, config, tokenizer = import_wenet(Path(args.checkpoint), Path(args.train_yaml),
                                            Path(args.cmvn) if args.cmvn else None,
                                            Path(args.units) if args.units else None)
    ms = ModelState(state, config, tokenizer, Path(args.checkpoint), {"imported_from": str(args.checkpoint)})
    return ms, {"num_experts": config.model.moe.num_experts, "vocab_size": config.model.vocab_size}


def _inputs(args: argparse.Namespace) -> list[Path]:
    names = ("path", "checkpoints", "dense", "checkpoint", "train_yaml", "config", "run")
    found = []
    for name in names:
        value = getattr(args, name, None)
        found += [Path(v) for v in (value if isinstance(value, list) else [value]) if v]
    return found


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    if any(output.resolve() == p.resolve() for p in _inputs(args)):
        print(f"convert: the output {output} is an input; conversion never overwrites its input", file=sys.stderr)
        return 2
    try:
        ms, summary = args._convert(args)
    except (OSError, ValueError) as e:  # a bad input: its message names the file, key or shape
        print(f"convert {args.conversion}: {e}", file=sys.stderr)
        return 1
    save_model(output, ms.state, ms.config, ms.tokenizer, **ms.extra)
    experts = ms.config.model.moe.num_experts
    summary.update(output=str(output), size_mb=round(output.stat().st_size / 2**20, 2), experts=experts,
                   parameters=sum(v.numel() for v in ms.state.values() if v.is_floating_point()))
    print(json.dumps(summary, indent=1))
    return 0
