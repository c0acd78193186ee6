"""The recognition pipeline: read, resample and fbank utterances, batch or stream them, decode every mode.

Utterances are sorted by length (in windows of 1000) and decoded in padded
batches of at most ``batch_frames`` feature frames; with ``options.streaming``
they are decoded as ``options.streams`` concurrent streams instead, chunk by
chunk, a waiting utterance joining whenever one ends. Each mode is decoded in
its own pass, encoder included, so its decode time is what that mode alone
costs; reading, resampling and fbank are timed once and apart.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from moe_asr.checkpoint import LoadedModel, build_trained_model, load_model
from moe_asr.checkpoint.average import average, run_checkpoints
from moe_asr.data import sources
from moe_asr.data.feature_batches import FeatureBatch, feature_batches
from moe_asr.data.kaldi_text import write_table
from moe_asr.data.tokenizer import normalize_text
from moe_asr.decode import Hypothesis, decode
from moe_asr.decode.options import DecodeOptions
from moe_asr.decode.search import check_methods
from moe_asr.decode.streaming import StreamingRecognizer


def load_for_decoding(path: str | Path, tag: Optional[str] = None, average_best: Optional[int] = None,
                      device: str = "cpu") -> tuple[LoadedModel, list[str]]:
    """The model in eval mode on ``device``, and the checkpoints it was read from (several when averaged).

    ``path`` is a model file, run directory, checkpoints directory or tag directory; ``tag`` picks a
    run's checkpoint, ``average_best`` averages the run's N checkpoints with the lowest CV loss.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available")
    if average_best is None:
        if tag is not None and Path(path).is_file():
            raise ValueError(f"{path}: a model file has no checkpoint tags; a tag applies to run directories")
        loaded = load_model(path, tag, device)
        loaded.model.eval()
        return loaded, [str(loaded.source)]
    if tag is not None:
        raise ValueError("a tag and averaging exclude each other (averaging picks the checkpoints)")
    if average_best < 1:
        raise ValueError(f"averaging needs N >= 1 checkpoints, got {average_best}")
    ms = average(run_checkpoints(path, average_best, "best"))
    model = build_trained_model(ms).to(device).eval()
    return LoadedModel(model, ms.config, ms.tokenizer, ms.source), ms.extra["averaged"]


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


def recognize(loaded: LoadedModel, source: sources.Source, modes: Sequence[str], options: DecodeOptions,
              batch_frames: int = 4000, device: str = "cpu") -> Results:
    """Decode every readable utterance of ``source`` with each mode, timing features and each mode apart.

    When streaming, each mode has its own recognizer, whose streams carry over from one feature
    batch to the next, so utterances join as others finish whatever the batches.
    """
    check_methods(modes)
    if batch_frames < 1:
        raise ValueError(f"batch_frames must be >= 1, got {batch_frames}")
    tokenizer = loaded.tokenizer
    res = Results({m: {} for m in modes}, decode_seconds=dict.fromkeys(modes, 0.0))
    recognizers = ({m: StreamingRecognizer(loaded.model, options, [m]) for m in modes}
                   if options.streaming else {})
    waiting: dict[str, Waiting] = {m: deque() for m in recognizers}

    def decode_mode(m: str, batch: Optional[FeatureBatch]) -> dict[str, Hypothesis]:
        """One mode on one batch (None: the end of the input, the streams drain)."""
        if not options.streaming:
            feats, lengths = batch.feats.to(device), batch.feats_lengths.to(device)
            return dict(zip(batch.keys, decode(loaded.model, feats, lengths, [m], options)[m]))
        if batch is not None:
            waiting[m].extend((k, batch.feats[i, :n]) for i, (k, n) in
                              enumerate(zip(batch.keys, batch.feats_lengths.tolist())))
        return _stream(recognizers[m], waiting[m], options.streams, drain=batch is None)

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

        batches = feature_batches(source, loaded.config.data.features, batch_frames, on_skip)
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
    if options.streaming:
        decode_modes(None)
    return res


def transcribe(model: str | Path | LoadedModel, wavs: Sequence[str | Path], options: DecodeOptions = DecodeOptions(),
               mode: str = "attention_rescoring", device: str = "cpu") -> dict[str, str]:
    """``{key: transcript}`` of audio files (key = file name without extension) with one mode.

    An unreadable file is an error naming it, not a missing key.
    """
    loaded = model if isinstance(model, LoadedModel) else load_for_decoding(model, device=device)[0]
    res = recognize(loaded, sources.wav_files([str(w) for w in wavs]), [mode], options, device=device)
    if res.skips:
        first, more = res.skips[0], len(res.skips) - 1
        raise ValueError(f"{first.key}: {first.reason}: {first.detail}" + (f" ({more} more)" if more else ""))
    return res.hyps[mode]


def write_outputs(res: Results, dirs: dict[str, str], out_dir: Path, summary: dict) -> None:
    """``<dir>/text`` per mode, ``ref.text`` (when there are references), ``skipped.txt``, ``summary.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for m, name in dirs.items():
        write_table(out_dir / name / "text", res.hyps[m])
    if res.refs:
        write_table(out_dir / "ref.text", res.refs)
    with open(out_dir / "skipped.txt", "w", encoding="utf-8") as f:
        f.writelines(f"{s.key}\t{s.reason}\t{s.detail}\n" for s in res.skips)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
