"""Real-time factor of models side by side: decoding modes, full context and streaming, 1 to N streams.

Usage: moe-asr bench-rtf conf/paper_dense_225m.yaml conf/paper_moe_1b.yaml [--seconds 10]
           [--modes encoder,ctc_greedy_search,attention_rescoring] [--contexts full,16,8,16/4]
           [--streams 1,4,16,64] [--threads 2] [--rounds 5] [--device cpu] [--json out.json]

A model is a config YAML (random weights: speed does not depend on them) or a
trained model (anything `moe-asr recognize --model` takes). Every row is timed
for every model in the same round, the models taking turns, so drift of the
machine hits them alike; each cell is the median over the rounds, with the
spread (min-max) beside it. RTF = seconds of compute / seconds of audio, over
all N streams (N utterances of --seconds each, random features).

Contexts: `full`, or `C` for streaming with chunk C (the encoder's caches, chunk by
chunk; several streams advance together in one batched call, as
`recognize --streaming --streams N` does), `C/L` for C with L left chunks.

Beside each row of a model with experts: the weight-reading floor, the time to
read once, at this machine's measured memory bandwidth, the weights each encoder
and decoder call touches (all non-expert weights plus the experts its tokens
were routed to, counted by the routers as the row ran). A streaming chunk of 16
frames at batch 1 already touches nearly every expert of every layer, so the
MoE model reads about E/top_k times the FFN weights of the dense one per chunk;
concurrent streams share those reads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from moe_asr.checkpoint import load_model
from moe_asr.decode import decode
from moe_asr.decode.streaming import StreamingRecognizer
from moe_asr.engine.config import ConfigError, load_config
from moe_asr.model.u2pp import U2PPModel, build_model
from moe_asr.moe.router import TopKRouter

MODES = ("encoder", "ctc_greedy_search", "ctc_prefix_beam_search", "attention_rescoring")


@dataclass
class Context:
    name: str
    chunk: int = -1       # -1: full context
    left: int = -1

    @classmethod
    def parse(cls, text: str) -> "Context":
        if text == "full":
            return cls("full")
        chunk, _, left = text.partition("/")
        try:
            c, l = int(chunk), int(left) if left else -1
        except ValueError:
            raise ValueError(f"--contexts: {text!r} is not full, C or C/L") from None
        if c < 1 or (left and l < 0):
            raise ValueError(f"--contexts: {text!r} needs a chunk >= 1 and left chunks >= 0")
        return cls(f"chunk{c}" + (f"_left{l}" if left else ""), c, l)


def _bytes(params, skip: set[int]) -> int:
    return sum(p.numel() * p.element_size() for p in params if id(p) not in skip)


class WeightReads:
    """Bytes of weights the model's calls read: each call's non-expert weights, plus the routed-to experts."""

    def __init__(self, model: U2PPModel) -> None:
        self.bytes = 0
        experts = {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}
        self.encoder_bytes = _bytes(model.encoder.parameters(), experts) + _bytes(model.ctc.parameters(), experts)
        self.decoder_bytes = _bytes(model.decoder.parameters(), experts)
        self._hooks = []
        for layer in model.moe_layers():
            if layer.router is not None:
                per_expert = _bytes(layer.experts.parameters(), set()) // layer.num_experts
                self._hooks.append(layer.router.register_forward_hook(self._counter(per_expert)))
        self.has_experts = bool(self._hooks)

    def _counter(self, per_expert: int) -> Callable:
        def hook(module: TopKRouter, inputs: tuple, output: tuple) -> None:
            self.bytes += per_expert * int(output[0].experts.unique().numel())
        return hook

    def encoder_calls(self, n: int = 1) -> None:
        self.bytes += n * self.encoder_bytes

    def decoder_call(self) -> None:
        self.bytes += self.decoder_bytes

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def memory_bandwidth(seconds: float = 0.5) -> float:
    """Bytes/s of reading a 256 MiB tensor (best of a few), at the current thread count."""
    x = torch.ones(64 * 2**20)
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or best == float("inf"):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


@dataclass
class Bench:
    """One model under test, with its weight-read counter."""
    name: str
    model: U2PPModel
    reads: WeightReads = field(init=False)

    def __post_init__(self) -> None:
        self.reads = WeightReads(self.model)


def load_bench(spec: str, vocab_size: int, device: str) -> Bench:
    """A config (random weights) or a trained model, in eval mode on ``device``."""
    if spec.endswith((".yaml", ".yml")):
        cfg = load_config(spec).model
        if cfg.vocab_size == "auto":
            cfg = replace(cfg, vocab_size=vocab_size)
        torch.manual_seed(0)
        model = build_model(cfg, load_cmvn=False)
    else:
        model = load_model(spec).model
    return Bench(Path(spec).stem, model.to(device).eval())


def run_row(bench: Bench, mode: str, ctx: Context, feats: torch.Tensor, lengths: torch.Tensor) -> float:
    """Seconds to decode every utterance of ``feats`` in ``mode``; weight reads counted meanwhile."""
    model, reads = bench.model, bench.reads
    start = time.perf_counter()
    if ctx.chunk < 0:
        reads.encoder_calls()
        if mode == "encoder":
            model.encode(feats, lengths, -1, -1)
        else:
            decode(model, feats, lengths, [mode], chunk_size=-1)
    elif mode == "encoder":
        w = model.encoder.stream_windows(ctx.chunk, ctx.left)
        reads.encoder_calls(max(1, -(-(feats.shape[1] - w.context + 1) // w.stride)))
        model.encoder.forward_chunk_by_chunk(feats, lengths, ctx.chunk, ctx.left)
    else:
        rec = StreamingRecognizer(model, ctx.chunk, ctx.left, methods=[mode])
        for i in range(feats.shape[0]):
            rec.add(str(i), feats[i, : int(lengths[i])], last=True)
        while len(rec):
            reads.encoder_calls()
            rec.step()
    if mode == "attention_rescoring":  # the streams end together: one decoder call
        reads.decoder_call()
    return time.perf_counter() - start


def _spread(values: list[float]) -> str:
    return f"{min(values):.4f}-{max(values):.4f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="config YAMLs (random weights) or trained models")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each utterance (default 10)")
    parser.add_argument("--modes", default="encoder,ctc_greedy_search,attention_rescoring",
                        help=f"comma-separated, out of {','.join(MODES)}")
    parser.add_argument("--contexts", default="full,16,8,16/4",
                        help="full, C (streaming, chunk C) or C/L (L left chunks); comma-separated")
    parser.add_argument("--streams", default="1,4,16,64", help="concurrent utterances per row, comma-separated")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per cell (after one warm-up)")
    parser.add_argument("--vocab-size", type=int, default=5000, help="for configs whose vocab_size is auto")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--json", help="also write every cell here")


def _options(args: argparse.Namespace) -> tuple[list[str], list[Context], list[int]]:
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise ValueError(f"--modes {args.modes!r}: choose from {','.join(MODES)}")
    contexts = [Context.parse(c) for c in args.contexts.split(",") if c]
    try:
        streams = [int(n) for n in args.streams.split(",") if n]
    except ValueError:
        raise ValueError(f"--streams {args.streams!r}: expected integers") from None
    if not streams or min(streams) < 1 or args.rounds < 1 or args.threads < 1 or args.seconds <= 0:
        raise ValueError("--streams, --rounds and --threads must be >= 1 and --seconds > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    return modes, contexts, streams


def run(args: argparse.Namespace) -> int:
    try:
        modes, contexts, streams = _options(args)
        benches = [load_bench(m, args.vocab_size, args.device) for m in args.models]
    except (OSError, ValueError, ConfigError) as e:
        print(f"moe-asr bench-rtf: error: {e}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    bandwidth = memory_bandwidth() if args.device == "cpu" else None
    frames = int(args.seconds * 100)
    names = [b.name for b in benches]
    print(f"bench-rtf: {', '.join(names)}; {args.seconds:g} s utterances, {args.threads} thread(s), "
          f"{args.device}, {args.rounds} rounds"
          + (f", memory bandwidth {bandwidth / 1e9:.1f} GB/s" if bandwidth else ""))
    rows = []
    header = f"{'mode':<22}{'context':<16}{'N':>4}" + "".join(f"  {n[:26]:>26}" for n in names)
    print(header + ("  ratio" if len(names) == 2 else ""))
    with torch.inference_mode():
        for mode in modes:
            for ctx in contexts:
                for n in streams:
                    torch.manual_seed(1)
                    feats = torch.randn(n, frames, benches[0].model.cfg.input_dim, device=args.device)
                    lengths = torch.full((n,), frames, dtype=torch.long, device=args.device)
                    times: dict[str, list[float]] = {b.name: [] for b in benches}
                    reads: dict[str, int] = {}
                    for r in range(args.rounds + 1):
                        for b in benches:  # the models take turns within a round
                            b.reads.bytes = 0
                            seconds = run_row(b, mode, ctx, feats, lengths)
                            if r:  # round 0 warms up
                                times[b.name].append(seconds / (n * args.seconds))
                            reads[b.name] = b.reads.bytes
                    cells = {}
                    for b in benches:
                        rtf = statistics.median(times[b.name])
                        floor = reads[b.name] / bandwidth / (n * args.seconds) if bandwidth else None
                        cells[b.name] = {"rtf": rtf, "min": min(times[b.name]), "max": max(times[b.name]),
                                         "weight_bytes_read": reads[b.name], "floor_rtf": floor,
                                         "has_experts": b.reads.has_experts}
                    rows.append({"mode": mode, "context": ctx.name, "streams": n, "models": cells})
                    line = f"{mode:<22}{ctx.name:<16}{n:>4}"
                    for b in benches:
                        c = cells[b.name]
                        floor = f" (floor {c['floor_rtf']:.4f})" if c["has_experts"] and c["floor_rtf"] else ""
                        line += f"  {c['rtf']:>8.4f} [{_spread(times[b.name])}]{floor}"
                    if len(names) == 2:
                        line += f"  {cells[names[1]]['rtf'] / cells[names[0]]['rtf']:.2f}x"
                    print(line, flush=True)
    if len(names) == 2:
        print(f"ratio: {names[1]} / {names[0]} RTF, medians measured side by side")
    if args.json:
        Path(args.json).write_text(json.dumps({"models": names, "seconds": args.seconds, "threads": args.threads,
                                               "device": args.device, "rounds": args.rounds,
                                               "memory_bandwidth": bandwidth, "rows": rows}, indent=1) + "\n")
    for b in benches:
        b.reads.close()
    return 0
