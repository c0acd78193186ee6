"""Recognise audio with a trained model: a Kaldi text file per decoding mode, the real-time factor, skips listed.

The input is WAV files, a wav.scp, a Kaldi data directory or shards, at any
sample rate (resampled to the model's, as in training). Features are the
model's own training features without dither or augmentation; CMVN is inside
the model. Utterances are sorted by length (in windows of 1000) and decoded in
padded batches of at most --batch-frames feature frames; with --streaming they
are decoded as --streams concurrent streams instead, chunk by chunk, a waiting
utterance joining whenever one ends. Output under OUTDIR:

  <mode>/text      `key transcript` per line, sorted by key, one directory per mode;
                   with --chunk-size C the name is <mode>_chunkC, then _leftL with
                   --num-left-chunks L >= 0 and _streaming with --streaming
  ref.text         the references (normalised as the model's tokenizer does), when the input has them
  skipped.txt      `key<TAB>reason<TAB>detail` of every utterance that could not be decoded
  summary.json     utterances, skips, audio seconds, per-mode decode seconds and RTF, model source

Each mode is decoded in its own pass, encoder included, so its RTF (decode
seconds / audio seconds) is what that mode alone costs; reading, resampling
and fbank are timed once and reported apart.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from moe_asr.checkpoint import LoadedModel, build_trained_model, load_model
from moe_asr.checkpoint.average import average, run_checkpoints
from moe_asr.data import sources
from moe_asr.data.feature_batches import FeatureBatch, feature_batches
from moe_asr.data.kaldi_text import write_table
from moe_asr.data.tokenizer import normalize_text
from moe_asr.decode import METHODS, Hypothesis, decode
from moe_asr.decode.streaming import StreamingRecognizer

log = logging.getLogger("moe_asr.recognize")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model file, run directory, checkpoints directory or checkpoint tag directory")
    parser.add_argument("--tag", help="checkpoint tag of a run directory (default: its latest)")
    parser.add_argument("--average", type=int, metavar="N",
                        help="average the N checkpoints of the run directory with the lowest CV loss")
    parser.add_argument("wavs", nargs="*", metavar="WAV", help="audio files (key = file name without extension)")
    parser.add_argument("--shards", help="shard list (shards.list from make-shards); key.txt gives references")
    parser.add_argument("--wav-scp", help="Kaldi wav.scp (`key path` lines)")
    parser.add_argument("--data-dir", help="Kaldi data directory: wav.scp, optional text (references) and segments")
    parser.add_argument("--mode", default="attention_rescoring",
                        help=f"comma-separated decoding modes out of {','.join(METHODS)} (default attention_rescoring)")
    parser.add_argument("--beam-size", type=int, default=10, help="prefix beam, rescoring n-best and attention beam")
    parser.add_argument("--ctc-weight", type=float, default=0.3, help="CTC weight in attention rescoring")
    parser.add_argument("--reverse-weight", type=float, default=0.5, help="R2L decoder weight in attention rescoring")
    parser.add_argument("--chunk-size", type=int, default=-1,
                        help="encoder chunk in frames after subsampling (default -1: full context)")
    parser.add_argument("--num-left-chunks", type=int, default=-1, help="left chunks each chunk sees (default -1: all)")
    parser.add_argument("--streaming", action="store_true",
                        help="run the encoder chunk by chunk with its caches (needs --chunk-size)")
    parser.add_argument("--streams", type=int, default=16,
                        help="with --streaming: utterances decoded concurrently, as one batch per chunk (default 16)")
    parser.add_argument("--batch-frames", type=int, default=4000,
                        help="padded feature frames per batch (default 4000); a longer utterance is decoded alone")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("-o", "--out-dir", required=True, help="output folder")


def mode_dir(method: str, chunk_size: int, num_left_chunks: int, streaming: bool) -> str:
    """The output directory of a mode: full-context and chunked results of one run can share an OUTDIR."""
    if chunk_size <= 0:
        return method
    name = f"{method}_chunk{chunk_size}"
    if num_left_chunks >= 0:
        name += f"_left{num_left_chunks}"
    return name + ("_streaming" if streaming else "")


def _check_options(args: argparse.Namespace) -> list[str]:
    """The requested modes; every option mistake is caught here, before the model is read."""
    modes = list(dict.fromkeys(m.strip() for m in args.mode.split(",") if m.strip()))
    unknown = [m for m in modes if m not in METHODS]
    if not modes or unknown:
        raise ValueError(f"--mode {args.mode!r}: choose from {','.join(METHODS)}")
    if args.chunk_size == 0:
        raise ValueError("--chunk-size must be > 0 (chunked) or -1 (full context)")
    if args.streaming and args.chunk_size < 0:
        raise ValueError("--streaming needs --chunk-size > 0")
    if args.batch_frames < 1:
        raise ValueError("--batch-frames must be >= 1")
    if args.streams < 1:
        raise ValueError("--streams must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    return modes


def _source(args: argparse.Namespace) -> sources.Source:
    given = [name for name, value in (("WAV", args.wavs), ("--shards", args.shards), ("--wav-scp", args.wav_scp),
                                      ("--data-dir", args.data_dir)) if value]
    if len(given) != 1:
        raise ValueError(f"give exactly one input (WAV..., --shards, --wav-scp or --data-dir), got {given or 'none'}")
    if args.shards:
        return sources.ShardSource(args.shards)
    if args.wav_scp:
        return sources.wav_scp(args.wav_scp)
    if args.data_dir:
        return sources.data_dir(args.data_dir)
    return sources.wav_files(args.wavs)


def _load(args: argparse.Namespace) -> tuple[LoadedModel, list[str]]:
    """The model, and the checkpoints it was read from (several when averaged)."""
    if args.average is None:
        if args.tag is not None and Path(args.model).is_file():
            raise ValueError(f"{args.model}: a model file has no checkpoint tags; --tag applies to run directories")
        loaded = load_model(args.model, args.tag, args.device)
        return loaded, [str(loaded.source)]
    if args.tag is not None:
        raise ValueError("--tag and --average exclude each other (--average picks the checkpoints)")
    if args.average < 1:
        raise ValueError("--average must be >= 1")
    ms = average(run_checkpoints(args.model, args.average, "best"))
    model = build_trained_model(ms).to(args.device).eval()
    return LoadedModel(model, ms.config, ms.tokenizer, ms.source), ms.extra["averaged"]


def _rtf(seconds: float, audio: float) -> Optional[float]:
    return seconds / audio if audio > 0 else None


def _show(rtf: Optional[float]) -> str:
    return "n/a" if rtf is None else f"{rtf:.4f}"


@dataclass
class Results:
    hyps: dict[str, dict[str, str]]  # mode -> key -> transcript
    refs: dict[str, str] = field(default_factory=dict)
    skips: list[sources.Skip] = field(default_factory=list)
    decode_seconds: dict[str, float] = field(default_factory=dict)
    audio_seconds: float = 0.0
    feature_seconds: float = 0.0
    decoded: int = 0


Waiting = deque[tuple[str, torch.Tensor]]
"""Utterances (key, features) that have not joined a streaming recognizer yet."""


def _stream(rec: StreamingRecognizer, waiting: Waiting, streams: int, drain: bool) -> dict[str, Hypothesis]:
    """Step ``rec`` with up to ``streams`` live streams, a waiting utterance joining whenever one ends,
    until none waits (with ``drain``, until every stream has finished); the finished ones' hypotheses."""
    (method,) = rec.methods
    out: dict[str, Hypothesis] = {}
    while waiting or (drain and len(rec)):
        while waiting and len(rec) < streams:
            key, feats = waiting.popleft()
            rec.add(key, feats, last=True)
        out.update((key, hyps[method]) for key, hyps in rec.step().items())
    return out


def recognize(loaded: LoadedModel, source: sources.Source, modes: list[str], args: argparse.Namespace) -> Results:
    """Decode every readable utterance of ``source`` with each mode, timing features and each mode apart.

    With ``--streaming`` each mode has its own recognizer, whose streams carry over from one feature
    batch to the next, so utterances join as others finish whatever the batches.
    """
    tokenizer = loaded.tokenizer
    res = Results({m: {} for m in modes}, decode_seconds=dict.fromkeys(modes, 0.0))
    recognizers = {m: StreamingRecognizer(loaded.model, args.chunk_size, args.num_left_chunks, [m], args.beam_size,
                                          args.ctc_weight, args.reverse_weight)
                   for m in modes} if args.streaming else {}
    waiting: dict[str, Waiting] = {m: deque() for m in recognizers}

    def decode_mode(m: str, batch: Optional[FeatureBatch]) -> dict[str, Hypothesis]:
        """One mode on one batch (None: the end of the input, the streams drain)."""
        if not args.streaming:
            feats, lengths = batch.feats.to(args.device), batch.feats_lengths.to(args.device)
            out = decode(loaded.model, feats, lengths, [m], beam_size=args.beam_size, chunk_size=args.chunk_size,
                         num_left_chunks=args.num_left_chunks, ctc_weight=args.ctc_weight,
                         reverse_weight=args.reverse_weight)[m]
            return dict(zip(batch.keys, out))
        if batch is not None:
            waiting[m].extend((k, batch.feats[i, :n]) for i, (k, n) in
                              enumerate(zip(batch.keys, batch.feats_lengths.tolist())))
        return _stream(recognizers[m], waiting[m], args.streams, drain=batch is None)

    def decode_modes(batch: Optional[FeatureBatch]) -> None:
        for m in modes:
            start = time.perf_counter()
            hyps = decode_mode(m, batch)
            res.decode_seconds[m] += time.perf_counter() - start
            res.hyps[m].update((k, tokenizer.decode(h.tokens)) for k, h in hyps.items())

    with tqdm(total=source.count, unit="utt", desc="recognize") as bar:
        def on_skip(skip: sources.Skip) -> None:
            res.skips.append(skip)
            if skip.text is not None:
                res.refs[skip.key] = normalize_text(skip.text, tokenizer.cfg)
            bar.update(1)

        batches = feature_batches(source, loaded.config.data.features, args.batch_frames, on_skip)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            res.feature_seconds += time.perf_counter() - start
            if batch is None:
                break
            decode_modes(batch)
            res.refs.update((k, normalize_text(t, tokenizer.cfg)) for k, t in zip(batch.keys, batch.texts)
                            if t is not None)
            res.audio_seconds += batch.seconds
            res.decoded += len(batch.keys)
            bar.update(len(batch.keys))
    if args.streaming:
        decode_modes(None)
    return res


def write_outputs(res: Results, dirs: dict[str, str], out_dir: Path, summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for m, name in dirs.items():
        write_table(out_dir / name / "text", res.hyps[m])
    if res.refs:
        write_table(out_dir / "ref.text", res.refs)
    with open(out_dir / "skipped.txt", "w", encoding="utf-8") as f:
        f.writelines(f"{s.key}\t{s.reason}\t{s.detail}\n" for s in res.skips)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        modes = _check_options(args)
        source = _source(args)
        loaded, checkpoints = _load(args)
    except (OSError, ValueError) as e:
        print(f"moe-asr recognize: error: {e}", file=sys.stderr)
        return 1
    dirs = {m: mode_dir(m, args.chunk_size, args.num_left_chunks, args.streaming) for m in modes}
    res = recognize(loaded, source, modes, args)
    reasons = Counter(s.reason for s in res.skips)
    summary = {
        "model": args.model, "checkpoints": checkpoints, "utterances": res.decoded, "skipped": len(res.skips),
        "skipped_by_reason": dict(reasons), "audio_seconds": res.audio_seconds,
        "feature_seconds": res.feature_seconds, "feature_rtf": _rtf(res.feature_seconds, res.audio_seconds),
        "modes": {dirs[m]: {"method": m, "decode_seconds": res.decode_seconds[m],
                            "rtf": _rtf(res.decode_seconds[m], res.audio_seconds)} for m in modes},
        "options": {"beam_size": args.beam_size, "ctc_weight": args.ctc_weight,
                    "reverse_weight": args.reverse_weight, "chunk_size": args.chunk_size,
                    "num_left_chunks": args.num_left_chunks, "streaming": args.streaming,
                    "batch_frames": args.batch_frames, "device": args.device},
    }
    out_dir = Path(args.out_dir)
    write_outputs(res, dirs, out_dir, summary)

    print(f"recognize: {res.decoded} utterances ({res.audio_seconds:.1f} s of audio) decoded, "
          f"{len(res.skips)} skipped -> {out_dir}")
    for m, name in dirs.items():
        print(f"  {name:<40} RTF {_show(summary['modes'][name]['rtf'])} "
              f"({res.decode_seconds[m]:.2f} s, encoder included)")
    print(f"  {'features (read, resample, fbank)':<40} RTF {_show(summary['feature_rtf'])} "
          f"({res.feature_seconds:.2f} s)")
    if res.skips:
        counts = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        log.warning("skipped %d (%s): listed in %s", len(res.skips), counts, out_dir / "skipped.txt")
    if res.decoded == 0:
        print("moe-asr recognize: error: no utterance could be decoded", file=sys.stderr)
        return 1
    return 0
