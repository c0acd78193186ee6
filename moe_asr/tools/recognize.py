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
import dataclasses
import logging
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from moe_asr.data import sources
from moe_asr.decode import METHODS
from moe_asr.decode.options import DecodeOptions
from moe_asr.inference import load_for_decoding, recognize, write_outputs

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


def _options(args: argparse.Namespace) -> tuple[list[str], DecodeOptions]:
    """The requested modes and decoding options; every option mistake is caught here, before the model is read."""
    modes = list(dict.fromkeys(m.strip() for m in args.mode.split(",") if m.strip()))
    unknown = [m for m in modes if m not in METHODS]
    if not modes or unknown:
        raise ValueError(f"--mode {args.mode!r}: choose from {','.join(METHODS)}")
    if args.batch_frames < 1:
        raise ValueError("--batch-frames must be >= 1")
    try:
        return modes, DecodeOptions(chunk_size=args.chunk_size, num_left_chunks=args.num_left_chunks,
                                    streaming=args.streaming, streams=args.streams, beam_size=args.beam_size,
                                    ctc_weight=args.ctc_weight, reverse_weight=args.reverse_weight)
    except ValueError as e:  # the options' own words, with the flags' names
        fields = "|".join(f.name for f in dataclasses.fields(DecodeOptions))
        raise ValueError(re.sub(rf"\b({fields})\b", lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from None


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


def _rtf(seconds: float, audio: float) -> Optional[float]:
    return seconds / audio if audio > 0 else None


def _show(rtf: Optional[float]) -> str:
    return "n/a" if rtf is None else f"{rtf:.4f}"


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        modes, options = _options(args)
        source = _source(args)
        loaded, checkpoints = load_for_decoding(args.model, args.tag, args.average, args.device)
    except (OSError, ValueError) as e:
        print(f"moe-asr recognize: error: {e}", file=sys.stderr)
        return 1
    dirs = {m: options.mode_name(m) for m in modes}
    res = recognize(loaded, source, modes, options, args.batch_frames, args.device)
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
