"""Streaming chunk by chunk, eager against ``torch.compile`` of the encoder's chunk step.

    python -m bench.compile_chunk conf/small_dense.yaml conf/small_moe.yaml --threads 1 --seconds 4

Each model streams one utterance of random features (batch 1) through
``forward_chunk_by_chunk`` at ``--chunk`` with ``--left`` chunks of context, eager, then
with ``encoder.forward_chunk`` replaced by ``torch.compile(..., dynamic=False)`` (inductor;
each window and cache shape compiles once, the first run pays for it). RTF is the best of
``--repeats`` runs; the outputs of both must agree within 1e-4.

Why: at batch-1 streaming a chunk is dozens of small ops per block, not weight reads
(``docs/benchmarks.md``); compiling fuses them where the graph is static. An MoE's routing
(per-expert row counts read on the host) splits its graph at every MoE layer.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo

from bench.encoder_breakdown import random_model
from moe_asr.model.u2pp import U2PPModel


def stream(model: U2PPModel, feats: torch.Tensor, chunk: int, left: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.encoder.forward_chunk_by_chunk(feats, torch.tensor([feats.shape[1]]), chunk, left)[0]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=4.0, help="utterance length (10 ms frames)")
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--left", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compile per window and cache shape, and per MoE graph piece
    print("| model | eager RTF | compiled RTF | eager/compiled | first compiled run | max difference |\n"
          "|---|---|---|---|---|---|")
    for path in args.configs:
        model = random_model(path)
        feats = torch.randn(1, int(args.seconds * 100), model.cfg.input_dim)
        run = lambda: stream(model, feats, args.chunk, args.left)  # noqa: E731
        reference = run()
        eager = best_of(args.repeats, run)
        model.encoder.forward_chunk = torch.compile(model.encoder.forward_chunk, dynamic=False)
        first = best_of(1, run)
        compiled = best_of(args.repeats, run)
        diff = (run() - reference).abs().max().item()
        if diff > 1e-4:
            raise SystemExit(f"{path}: the compiled chunk step differs from eager by {diff:.2e}")
        print(f"| {path} | {eager / args.seconds:.4f} | {compiled / args.seconds:.4f} | {eager / compiled:.2f}x | "
              f"{first:.0f} s | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
