"""Where an encoder's time goes: the share of subsampling, attention, convolution and FFN (MoE) modules.

    python -m bench.encoder_breakdown conf/small_dense.yaml conf/small_moe.yaml --threads 2 \
        --contexts full,16/4 --streams 1,16

Random weights and features (speed does not depend on them), eval mode, no
gradients. Each module kind is timed by wrapping the forwards of its modules;
the rest (norms, residuals, masks, caches) is "other". Models take turns in
every round; the median round counts.

Why: the MoE/dense RTF ratio of two models that differ only in their FFNs has
a floor set by the dense model itself, ``1 + s (r - 1)`` (``moe_asr.model.ffn_share``).
That bound is printed under each pair, with the FLOPs each model's call
did (``torch.utils.flop_counter``; padded expert rows count, as they are computed).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_asr.model.ffn_share import KINDS, ModuleTimers, ffn_flops_per_token, flop_bound
from moe_asr.model.u2pp import U2PPModel, build_model
from moe_asr.run.config import load_config

__all__ = ["KINDS", "build", "counted_flops", "ffn_flops_per_token", "random_model", "run_once"]


def random_model(path: str) -> U2PPModel:
    """The config's model in eval mode with seeded random weights (speed does not depend on them)."""
    cfg = load_config(path).model
    if cfg.vocab_size == "auto":
        cfg = replace(cfg, vocab_size=5000)
    torch.manual_seed(0)
    return build_model(cfg, load_cmvn=False).eval()


def build(path: str) -> tuple[U2PPModel, ModuleTimers]:
    model = random_model(path)
    return model, ModuleTimers(model)


def run_once(model: U2PPModel, context: str, feats: torch.Tensor, lengths: torch.Tensor) -> None:
    if context == "full":
        model.encoder(feats, lengths, -1)
    else:
        chunk, _, left = context.partition("/")
        model.encoder.forward_chunk_by_chunk(feats, lengths, int(chunk), int(left) if left else -1)


def counted_flops(model: U2PPModel, context: str, feats: torch.Tensor, lengths: torch.Tensor) -> int:
    """FLOPs of one call, as computed (a padded expert row costs what a real one does)."""
    with FlopCounterMode(display=False) as counter:
        run_once(model, context, feats, lengths)
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="model configs; the first is the reference of the bound")
    p.add_argument("--seconds", type=float, default=10.0, help="utterance length (default 10)")
    p.add_argument("--contexts", default="full,16/4", help="full, C or C/L, comma-separated")
    p.add_argument("--streams", default="1,16", help="utterances per call, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {Path(c).stem: build(c) for c in args.configs}
    frames = int(args.seconds * 100)
    print(f"encoder time shares, {args.seconds:g} s utterances, {args.threads} thread(s), median of "
          f"{args.rounds} rounds")
    print(f"{'model':22s} {'context':8s} {'N':>3s} {'RTF':>8s} " + " ".join(f"{k:>11s}" for k in KINDS)
          + f" {'other':>7s}")
    for context in args.contexts.split(","):
        for n in (int(s) for s in args.streams.split(",")):
            feats = torch.randn(n, frames, next(iter(models.values()))[0].cfg.input_dim)
            lengths = torch.full((n,), frames)
            rounds: dict[str, list[tuple[float, dict[str, float]]]] = defaultdict(list)
            with torch.inference_mode():
                for r in range(args.rounds + 1):
                    for name, (model, timers) in models.items():
                        timers.seconds.clear()
                        start = time.perf_counter()
                        run_once(model, context, feats, lengths)
                        total = time.perf_counter() - start
                        if r:  # round 0 warms up
                            rounds[name].append((total, dict(timers.seconds)))
            shares = {}
            for name, rs in rounds.items():
                total, parts = sorted(rs, key=lambda t: t[0])[len(rs) // 2]
                shares[name] = {k: parts.get(k, 0.0) / total for k in KINDS}
                rtf = statistics.median(t for t, _ in rs) / (args.seconds * n)
                cells = " ".join(f"{shares[name][k]:>10.0%} " for k in KINDS)
                print(f"{name:22s} {context:8s} {n:>3d} {rtf:>8.4f} {cells}{1 - sum(shares[name].values()):>7.0%}")
            ref_name, (ref_model, _) = next(iter(models.items()))
            with torch.inference_mode():
                ref_flops = counted_flops(ref_model, context, feats, lengths)
            for name, (model, _) in list(models.items())[1:]:
                ratio = ffn_flops_per_token(model) / ffn_flops_per_token(ref_model)
                s = shares[ref_name]["ffn"]
                with torch.inference_mode():
                    flops = counted_flops(model, context, feats, lengths)
                print(f"  {name}/{ref_name} at the dense FFN's cost per FLOP: >= 1 + {s:.2f} x ({ratio:g} - 1) "
                      f"= {flop_bound(s, ratio):.2f}x; FLOPs {flops / 1e9:.1f} G vs {ref_flops / 1e9:.1f} G "
                      f"({flops / ref_flops:.2f}x)")


if __name__ == "__main__":
    main()
