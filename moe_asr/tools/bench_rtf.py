"""Real-time factor of models side by side: decoding modes, full context and streaming, 1 to N streams.

Usage: moe-asr bench-rtf conf/paper_dense_225m.yaml conf/paper_moe_1b.yaml [--seconds 10]
           [--modes encoder,ctc_greedy_search,attention_rescoring] [--contexts full,16,8,16/4]
           [--streams 1,4,16,64] [--threads 2] [--rounds 5] [--device cpu] [--onnx [--int8]] [--vs-loop] [--json out.json]

A model is a config YAML (random weights: speed does not depend on them) or a
trained model (anything `moe-asr recognize --model` takes). Every row is timed
for every model in the same round, the models taking turns, so drift of the
machine hits them alike; each cell is the median over the rounds, with the
spread (min-max) beside it. RTF = seconds of compute / seconds of audio, over
all N streams (N utterances of --seconds each, random features).

Contexts: `full`, or `C` for streaming with chunk C (the encoder's caches, chunk by
chunk; several streams advance together in one batched call, as
`recognize --streaming --streams N` does), `C/L` for C with L left chunks.

Beside each row of every model: the weight-reading floor, the time to read once,
at this machine's measured memory bandwidth, the weights each encoder and
decoder call touches (all non-expert weights, a dense model's FFNs included,
plus the experts its tokens were routed to, counted by the routers as the row
ran). A streaming chunk of 16
frames at batch 1 already touches nearly every expert of every layer, so the
MoE model reads about E/top_k times the FFN weights of the dense one per chunk;
concurrent streams share those reads.

For a dense model followed by an MoE model of the same encoder width and depth,
each encoder row also prints the FLOP bound of their ratio, ``1 + s (r - 1)``
(``moe_asr.model.ffn_share``): ``s`` the share of the dense encoder's time spent in
its FFNs in that row (median of the rounds), ``r`` the MoE's FFN FLOPs per token over
the dense model's.

--vs-loop: each MoE model is also timed with ``moe.impl: loop`` (WeNet's per-expert
loop; the same model object and weights, switched for its turn), right after its own
turn in every round, and its cell shows loop/ours (the median of the rounds' ratios).

--onnx: each model is also exported (`moe-asr export`'s graphs, in a temporary
folder) and its encoder rows timed under ONNX Runtime as well (CPU, --threads
intra-op threads), in the same rounds, right after the eager model's turn:
full context with encoder_ctc.onnx, `C/L` with streaming_encoder.onnx driven
chunk by chunk, the N streams as one batch. Those graphs also compute the CTC
log-probs, a small extra the eager rows leave out. A streaming graph keeps a
bounded cache, so a `C` context (no left limit) has no ONNX cell: it is
skipped, and the run says why. Before a cell is timed, the graph's encoder
output must equal the eager one on that cell's input to 1e-4, or the run stops.
With --int8 the graphs' int8 twins (`moe-asr export --int8`) are timed too, right
after the float ones, in an `(onnx int8)` line; their check is 5% relative RMS.
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
from moe_asr.decode import DecodeOptions, decode
from moe_asr.decode.streaming import StreamingRecognizer
from moe_asr.run.config import ConfigError, load_config
from moe_asr.model.ffn_share import ModuleTimers, comparable, ffn_flops_per_token, flop_bound
from moe_asr.model.u2pp import U2PPModel, build_model
from moe_asr.moe.router import Router
from moe_asr.export.onnx_runtime import RUNTIME, OnnxEncoder, OnnxMismatch

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
        # routed experts are counted as the routers touch them; a dense FFN (no router) is read by every call
        experts = {id(p) for layer in model.moe_layers() if layer.router is not None
                   for p in layer.experts.parameters()}
        self.encoder_bytes = _bytes(model.encoder.parameters(), experts) + _bytes(model.ctc.parameters(), experts)
        self.decoder_bytes = _bytes(model.decoder.parameters(), experts)
        self._hooks = []
        for layer in model.moe_layers():
            if layer.router is not None:
                per_expert = _bytes(layer.experts.parameters(), set()) // layer.num_experts
                self._hooks.append(layer.router.register_forward_hook(self._counter(per_expert)))
        self.has_experts = bool(self._hooks)

    def _counter(self, per_expert: int) -> Callable:
        def hook(module: Router, inputs: tuple, output: tuple) -> None:
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
    """One model under test, with its weight-read counter (and, with --onnx, its exported graphs).

    ``impl``: the ``moe.impl`` its MoE layers run with on its turns (None: as built); a loop twin
    (``loop_of``, --vs-loop) is the same model object, weights and counter run with ``impl: loop``.
    """
    name: str
    model: U2PPModel
    reads: Optional[WeightReads] = None
    onnx: Optional[OnnxEncoder] = None
    impl: Optional[str] = None
    loop_of: Optional[str] = None
    timers: Optional[ModuleTimers] = None

    def __post_init__(self) -> None:
        if self.reads is None:
            self.reads = WeightReads(self.model)
        if self.impl is None and self.reads.has_experts:
            self.impl = self.model.moe_layers()[0].impl

    def loop_twin(self) -> Optional["Bench"]:
        """The same model with WeNet's per-expert loop in every MoE layer; None without experts or if it is the loop."""
        if not self.reads.has_experts or self.impl == "loop":
            return None
        return Bench(f"{self.name}[loop]", self.model, self.reads, impl="loop", loop_of=self.name)

    def take_turn(self) -> None:
        """Set the MoE layers to this bench's impl (its loop twin shares the model)."""
        if self.impl is not None:
            for layer in self.model.moe_layers():
                layer.impl = self.impl


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


def encoder_out(model: U2PPModel, ctx: Context, feats: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the encoder mode computes, output and mask: the whole batch at once, or chunk by chunk."""
    if ctx.chunk < 0:
        return model.encode(feats, lengths, -1, -1)
    return model.encoder.forward_chunk_by_chunk(feats, lengths, ctx.chunk, ctx.left)


def run_row(bench: Bench, mode: str, ctx: Context, feats: torch.Tensor, lengths: torch.Tensor) -> float:
    """Seconds to decode every utterance of ``feats`` in ``mode``; weight reads counted meanwhile."""
    model, reads = bench.model, bench.reads
    bench.take_turn()
    start = time.perf_counter()
    if mode == "encoder":
        if ctx.chunk < 0:
            reads.encoder_calls()
        else:
            w = model.encoder.stream_windows(ctx.chunk, ctx.left)
            reads.encoder_calls(max(1, -(-(feats.shape[1] - w.context + 1) // w.stride)))
        encoder_out(model, ctx, feats, lengths)
    elif ctx.chunk < 0:
        reads.encoder_calls()
        decode(model, feats, lengths, [mode])
    else:
        rec = StreamingRecognizer(model, DecodeOptions(chunk_size=ctx.chunk, num_left_chunks=ctx.left), [mode])
        for i in range(feats.shape[0]):
            rec.add(str(i), feats[i, : int(lengths[i])], last=True)
        while len(rec):
            reads.encoder_calls()
            rec.step()
    if mode == "attention_rescoring":  # the streams end together: one decoder call
        reads.decoder_call()
    return time.perf_counter() - start


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
    parser.add_argument("--onnx", action="store_true",
                        help="also time each model's exported encoder graphs under ONNX Runtime (CPU, --threads) "
                             "in the encoder rows: full and C/L contexts; a C context without a left limit is "
                             "skipped (the streaming graph's cache is bounded); needs --device cpu")
    parser.add_argument("--int8", action="store_true",
                        help="with --onnx: also time the graphs' int8 twins (moe-asr export --int8)")
    parser.add_argument("--vs-loop", action="store_true",
                        help="also time each MoE model with moe.impl: loop (WeNet's per-expert loop; same weights) "
                             "in the same rounds, and print loop/ours beside it")
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
    if args.onnx and (args.device != "cpu" or "encoder" not in modes):
        raise ValueError("--onnx times ONNX Runtime on CPU in the encoder rows: give --device cpu and the encoder mode")
    if args.int8 and not args.onnx:
        raise ValueError("--int8 times the exported int8 graphs: give --onnx too")
    return modes, contexts, streams


def _onnx_cells(benches: list[Bench], ctx: Context, feats: torch.Tensor, lengths: torch.Tensor,
                where: str) -> dict[tuple[str, str], Callable[[], object]]:
    """Each model's graph runs (float, and int8 with --int8) for this encoder cell, checked once
    against the eager output."""
    runs = {}
    for b in benches:
        if b.onnx is not None and not b.onnx.skip_reason(ctx.chunk, ctx.left):
            eager = encoder_out(b.model, ctx, feats, lengths)
            for kind in b.onnx.kinds:
                runs[b.name, kind] = b.onnx.prepare(ctx.chunk, ctx.left, feats, lengths, kind)
                b.onnx.check(kind, runs[b.name, kind](), *eager, f"{b.name} {where}")
    return runs


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rtf(seconds: list[float], audio: float) -> dict[str, float]:
    """Median and spread of the rounds' RTFs, round 0 (the warm-up) left out."""
    rtfs = [s / audio for s in seconds[1:]]
    return {"rtf": statistics.median(rtfs), "min": min(rtfs), "max": max(rtfs)}


def measure_row(benches: list[Bench], mode: str, ctx: Context, n: int, args: argparse.Namespace,
                bandwidth: Optional[float]) -> dict:
    """One row, the models taking turns within each round (eager, then its graph); JSON-ready."""
    frames = int(args.seconds * 100)
    torch.manual_seed(1)
    feats = torch.randn(n, frames, benches[0].model.cfg.input_dim, device=args.device)
    lengths = torch.full((n,), frames, dtype=torch.long, device=args.device)
    onnx = _onnx_cells(benches, ctx, feats, lengths, f"{ctx.name} N={n}") if mode == "encoder" else {}
    eager: dict[str, list[float]] = {b.name: [] for b in benches}
    graph: dict[tuple[str, str], list[float]] = {key: [] for key in onnx}
    reads: dict[str, int] = {}
    ffn_shares: list[float] = []
    for _ in range(args.rounds + 1):
        for b in benches:
            b.reads.bytes = 0
            timers = b.timers if mode == "encoder" else None
            if timers is not None:
                timers.seconds.clear()
            eager[b.name].append(run_row(b, mode, ctx, feats, lengths))
            reads[b.name] = b.reads.bytes
            if timers is not None:
                ffn_shares.append(timers.seconds["ffn"] / eager[b.name][-1])
            for key in onnx:
                if key[0] == b.name:
                    graph[key].append(_timed(onnx[key]))
    audio = n * args.seconds
    cells = {}
    for b in benches:
        cells[b.name] = {**_rtf(eager[b.name], audio), "weight_bytes_read": reads[b.name],
                         "floor_rtf": reads[b.name] / bandwidth / audio if bandwidth else None,
                         "has_experts": b.reads.has_experts}
        if b.loop_of:
            cells[b.name]["loop_over_ours"] = statistics.median(
                t / o for t, o in zip(eager[b.name][1:], eager[b.loop_of][1:]))
        for kind in b.onnx.kinds if b.onnx is not None and mode == "encoder" else ():
            if (b.name, kind) in onnx:
                cell = _rtf(graph[b.name, kind], audio)
                cells[b.name][kind] = {**cell, "eager_over_onnx": cells[b.name]["rtf"] / cell["rtf"]}
            else:
                cells[b.name][kind] = {"skipped": b.onnx.skip_reason(ctx.chunk, ctx.left)}
    row = {"mode": mode, "context": ctx.name, "streams": n, "models": cells}
    if ffn_shares:
        share = statistics.median(ffn_shares[1:])
        row["flop_bound"] = {"dense_ffn_share": share, "flops_ratio": flops_ratio(benches),
                             "bound": flop_bound(share, flops_ratio(benches))}
    return row


def flops_ratio(benches: list[Bench]) -> float:
    """FFN FLOPs per token of the second model over the first's."""
    return ffn_flops_per_token(benches[1].model) / ffn_flops_per_token(benches[0].model)


def _spread(cell: dict) -> str:
    return f"{cell['min']:.4f}-{cell['max']:.4f}"


def _print_row(row: dict, names: list[str]) -> None:
    """The eager line (loop twins with loop/ours, the pair's ratio and the FLOP bound beside it) and, for a
    row with ONNX cells, the ONNX line under it (eager/onnx beside each)."""
    cells = [row["models"][n] for n in names]
    line = f"{row['mode']:<22}{row['context']:<16}{row['streams']:>4}"
    for c in cells:
        floor = f" (floor {c['floor_rtf']:.4f})" if c["floor_rtf"] else ""
        line += f"  {c['rtf']:>8.4f} [{_spread(c)}]{floor}"
        if "loop_over_ours" in c:
            line += f" loop/ours {c['loop_over_ours']:.2f}x"
    pair = [row["models"][n] for n in names if "loop_over_ours" not in row["models"][n]]
    if len(pair) == 2:
        line += f"  {pair[1]['rtf'] / pair[0]['rtf']:.2f}x"
        if "flop_bound" in row:
            line += f" (bound {row['flop_bound']['bound']:.2f}x)"
    print(line, flush=True)
    for kind in ("onnx", "onnx_int8"):
        onnx = [c.get(kind) or {} for c in cells]
        if any("rtf" in o for o in onnx):
            line = f"{'  (' + kind.replace('_', ' ') + ')':<42}"
            for o in onnx:
                line += f"  {o['rtf']:>8.4f} [{_spread(o)}] eager/onnx {o['eager_over_onnx']:.2f}x" if "rtf" in o \
                    else f"  {'skipped':>8}"
            if len(onnx) == 2 and all("rtf" in o for o in onnx):
                line += f"  {onnx[1]['rtf'] / onnx[0]['rtf']:.2f}x"
            print(line, flush=True)


def _print_skips(benches: list[Bench], contexts: list[Context]) -> None:
    """Why a context has no ONNX cells, once for the whole run."""
    for ctx in contexts:
        skipped: dict[str, list[str]] = {}
        for b in benches:
            if b.onnx is not None and (reason := b.onnx.skip_reason(ctx.chunk, ctx.left)):
                skipped.setdefault(reason, []).append(b.name)
        for reason, models in skipped.items():
            print(f"onnx skipped at {ctx.name} for {', '.join(models)}: {reason}")


def run(args: argparse.Namespace) -> int:
    try:
        modes, contexts, streams = _options(args)
        benches = [load_bench(m, args.vocab_size, args.device) for m in args.models]
        pair = [b.name for b in benches]
        if args.vs_loop:
            benches = [t for b in benches for t in (b, b.loop_twin()) if t is not None]
    except (OSError, ValueError, ConfigError) as e:
        print(f"moe-asr bench-rtf: error: {e}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    if args.onnx:
        streaming = list(dict.fromkeys((c.chunk, c.left) for c in contexts if c.chunk > 0 and c.left >= 0))
        for b in benches:
            if b.loop_of is None:
                b.onnx = OnnxEncoder(b.model, streaming, args.threads, args.int8)
    bandwidth = memory_bandwidth() if args.device == "cpu" else None
    names = [b.name for b in benches]
    if len(pair) == 2 and "encoder" in modes and comparable(benches[0].model, benches[1].model):
        benches[0].timers = ModuleTimers(benches[0].model)  # the dense FFN share s of the bound, encoder rows
    print(f"bench-rtf: {', '.join(names)}; {args.seconds:g} s utterances, {args.threads} thread(s), "
          f"{args.device}, {args.rounds} rounds"
          + (f", memory bandwidth {bandwidth / 1e9:.1f} GB/s" if bandwidth else "")
          + (f"; encoder rows also under {RUNTIME}" if args.onnx else ""))
    print(f"{'mode':<22}{'context':<16}{'N':>4}" + "".join(f"  {n[:26]:>26}" for n in names)
          + ("  ratio" if len(pair) == 2 else ""))
    if args.onnx:
        _print_skips(benches, contexts)
    rows = []
    try:
        with torch.inference_mode():
            for mode in modes:
                for ctx in contexts:
                    for n in streams:
                        rows.append(measure_row(benches, mode, ctx, n, args, bandwidth))
                        _print_row(rows[-1], names)
    except OnnxMismatch as e:
        print(f"moe-asr bench-rtf: error: {e}", file=sys.stderr)
        return 1
    if len(pair) == 2:
        print(f"ratio: {pair[1]} / {pair[0]} RTF, medians measured side by side"
              + ("; bound: 1 + s (r - 1), s the share of its encoder time "
                 f"{pair[0]} spends in FFNs in that row, r = {flops_ratio(benches):g} "
                 f"its FFN FLOPs per token over {pair[0]}'s (the least ratio at equal cost per FFN FLOP)"
                 if benches[0].timers is not None else ""))
    if args.vs_loop:
        print("loop/ours: the same model's RTF with moe.impl: loop over its RTF as built, median of the rounds' ratios")
    if args.json:
        Path(args.json).write_text(json.dumps({"models": names, "seconds": args.seconds, "threads": args.threads,
                                               "device": args.device, "rounds": args.rounds,
                                               "memory_bandwidth": bandwidth,
                                               "onnx_runtime": RUNTIME if args.onnx else None, "rows": rows},
                                              indent=1) + "\n")
    for b in benches:
        if b.loop_of is None:
            b.reads.close()
    return 0
