"""Data pipeline throughput per DataLoader worker, against the same stages written the WeNet way.

``python -m bench.data`` builds shards from the shipped FSDD audio (``--fsdd``, or
takes ``--shards``), runs one training epoch through this package's pipeline
and through a per-sample generator chain doing the same work in WeNet's order
(tar -> decode -> tokenize -> filter -> resample -> speed -> fbank -> SpecAugment
-> SpecSub -> shuffle -> sort -> batch -> pad), both in one process with one
torch thread (= one worker), and prints utterances/s, audio hours/s and the
ratio. ``--train-config`` also trains the tiny model on the loader's batches
and reports how much of each step the trainer spends waiting for data.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torchaudio.compliance.kaldi import fbank as kaldi_fbank

from moe_asr.data.batch import Batch
from moe_asr.data.batching import pad
from moe_asr.data.config import DataConfig, TokenizerConfig
from moe_asr.data.loader import AsrDataLoader
from moe_asr.data.manifest import Utterance
from moe_asr.data.shards import read_shard_list, write_shards
from moe_asr.data.tokenizer import Tokenizer, train_tokenizer
from moe_asr.schema import from_dict
from moe_asr.symbols import IGNORE_ID

# The shared data folder sits next to the repository; --fsdd points elsewhere.
FSDD = (Path(__file__).resolve().parents[1] / "../shared/data/fsdd/recordings").resolve()
DIGITS = "zero one two three four five six seven eight nine".split()


# --------------------------------------------------------------------------- the WeNet-style reference


def ref_tar(shards: Iterable[str]) -> Iterator[dict]:
    for shard in shards:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            sample: dict = {}
            for member in tar:
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if sample and sample["key"] != key:
                    yield sample
                    sample = {}
                sample["key"] = key
                data = tar.extractfile(member).read()
                sample["txt" if ext == "txt" else "audio"] = data.decode() if ext == "txt" else data
            if sample:
                yield sample


def ref_decode(samples: Iterable[dict]) -> Iterator[dict]:
    for s in samples:
        wave, sr = sf.read(io.BytesIO(s["audio"]), dtype="float32", always_2d=True)
        yield {"key": s["key"], "txt": s["txt"], "wav": torch.from_numpy(wave.mean(1))[None], "sample_rate": sr}


def ref_tokenize(samples: Iterable[dict], tokenizer: Tokenizer) -> Iterator[dict]:
    for s in samples:
        s["label"] = tokenizer.encode(s["txt"])
        yield s


def ref_filter(samples: Iterable[dict], cfg: DataConfig) -> Iterator[dict]:
    f = cfg.filters
    for s in samples:
        frames = s["wav"].size(1) / s["sample_rate"] * 1000 / cfg.features.frame_shift_ms
        if f.min_frames <= frames <= f.max_frames and f.min_tokens <= len(s["label"]) <= f.max_tokens:
            yield s


def ref_resample(samples: Iterable[dict], rate: int) -> Iterator[dict]:
    for s in samples:
        if s["sample_rate"] != rate:
            s["wav"] = torchaudio.functional.resample(s["wav"], s["sample_rate"], rate)
            s["sample_rate"] = rate
        yield s


def ref_speed(samples: Iterable[dict], speeds: list[float], rng: random.Random) -> Iterator[dict]:
    for s in samples:
        speed = rng.choice(speeds)
        if speed != 1.0:
            s["wav"] = torchaudio.functional.resample(s["wav"], int(round(s["sample_rate"] * speed)),
                                                      s["sample_rate"])
        yield s


def ref_fbank(samples: Iterable[dict], cfg: DataConfig, dither: float) -> Iterator[dict]:
    fc = cfg.features
    for s in samples:
        s["feat"] = kaldi_fbank(s["wav"] * (1 << 15), num_mel_bins=fc.num_mel_bins, frame_length=fc.frame_length_ms,
                                frame_shift=fc.frame_shift_ms, dither=dither, energy_floor=0.0,
                                sample_frequency=s["sample_rate"])
        yield s


def ref_spec_aug(samples: Iterable[dict], cfg: DataConfig, rng: random.Random) -> Iterator[dict]:
    a = cfg.specaug
    for s in samples:
        y = s["feat"].clone()
        frames, bins = y.shape
        for _ in range(a.num_t_mask):
            start = rng.randint(0, frames - 1)
            y[start:min(frames, start + rng.randint(1, a.max_t)), :] = 0
        for _ in range(a.num_f_mask):
            start = rng.randint(0, bins - 1)
            y[:, start:min(bins, start + rng.randint(1, a.max_f))] = 0
        s["feat"] = y
        yield s


def ref_spec_sub(samples: Iterable[dict], cfg: DataConfig, rng: random.Random) -> Iterator[dict]:
    c = cfg.specsub
    for s in samples:
        x = s["feat"]
        y = x.clone()
        frames = x.size(0)
        for _ in range(c.num_t_sub):
            start = rng.randint(0, frames - 1)
            end = min(frames, start + rng.randint(1, c.max_t))
            pos = rng.randint(0, start)
            y[start:end] = x[start - pos:end - pos]
        s["feat"] = y
        yield s


def ref_shuffle(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buf = []
    for s in samples:
        buf.append(s)
        if len(buf) >= size:
            rng.shuffle(buf)
            yield from buf
            buf = []
    rng.shuffle(buf)
    yield from buf


def ref_sort(samples: Iterable[dict], size: int) -> Iterator[dict]:
    buf = []
    for s in samples:
        buf.append(s)
        if len(buf) >= size:
            buf.sort(key=lambda x: x["feat"].size(0))
            yield from buf
            buf = []
    buf.sort(key=lambda x: x["feat"].size(0))
    yield from buf


def ref_batch(samples: Iterable[dict], max_frames: int) -> Iterator[list[dict]]:
    buf: list[dict] = []
    longest = 0
    for s in samples:
        n = s["feat"].size(0)
        longest = max(longest, n)
        if buf and longest * (len(buf) + 1) > max_frames:
            yield buf
            buf, longest = [], n
        buf.append(s)
    if buf:
        yield buf


def ref_padding(batches: Iterable[list[dict]]) -> Iterator[Batch]:
    for b in batches:
        feats = [s["feat"] for s in b]
        labels = [torch.tensor(s["label"], dtype=torch.int64) for s in b]
        yield Batch([s["key"] for s in b], pad(feats, 0.0), torch.tensor([f.size(0) for f in feats]),
                    pad(labels, IGNORE_ID), torch.tensor([len(x) for x in labels]))


def reference_pipeline(shards: list[str], cfg: DataConfig, tokenizer: Tokenizer, train: bool,
                       seed: int = 0) -> Iterator[Batch]:
    """The WeNet-style chain: one generator per stage, one sample at a time."""
    rng = random.Random(seed)
    s: Iterable = ref_tar(shards)
    s = ref_filter(ref_tokenize(ref_decode(s), tokenizer), cfg)
    s = ref_resample(s, cfg.features.sample_rate)
    if train:
        s = ref_speed(s, cfg.features.speed_perturb, rng)
    s = ref_fbank(s, cfg, cfg.features.dither if train else 0.0)
    if train and cfg.specaug.enabled:
        s = ref_spec_aug(s, cfg, rng)
    if train and cfg.specsub.enabled:
        s = ref_spec_sub(s, cfg, rng)
    if train and cfg.batching.shuffle:
        s = ref_shuffle(s, cfg.batching.shuffle_size, rng)
    if cfg.batching.sort:
        s = ref_sort(s, cfg.batching.sort_size)
    return ref_padding(ref_batch(s, cfg.batching.max_frames_in_batch))


# --------------------------------------------------------------------------- benchmark


def bench_config(shard_list: str, units: str) -> DataConfig:
    """A WeNet-like training setup: 3-way speed perturbation, dither, SpecAugment and SpecSub, dynamic batches."""
    return from_dict(DataConfig, {
        "train_shards": shard_list, "num_workers": 0, "tokenizer": {"symbol_table": units, "case": "lower"},
        "features": {"speed_perturb": [0.9, 1.0, 1.1]}, "specsub": {"enabled": True},
        "filters": {"min_frames": 1, "max_frames": 3000}, "batching": {"max_frames_in_batch": 6000, "shuffle_size": 500,
                                                   "sort_size": 100}})


def make_fsdd_shards(fsdd: Path, out: Path, utts: int, concat: int, per_shard: int) -> tuple[str, str]:
    """Shards of ``utts`` utterances, each ``concat`` random FSDD recordings joined (longer audio)."""
    files = sorted(fsdd.glob("*.wav"))
    rng = random.Random(0)
    items = []
    for i in range(utts):
        parts = [files[rng.randrange(len(files))] for _ in range(concat)]
        if concat == 1:
            path = parts[0]
        else:
            path = out / f"cat{i}.wav"
            sf.write(path, np.concatenate([sf.read(p, dtype="float32")[0] for p in parts]), 8000, subtype="PCM_16")
        items.append(Utterance(f"u{i:06d}", str(path), " ".join(DIGITS[int(p.name[0])] for p in parts)))
    write_shards(items, out / "shards", per_shard)
    tok_cfg, _ = train_tokenizer([u.text for u in items], TokenizerConfig(case="lower"), out / "tok")
    return str(out / "shards" / "shards.list"), str(tok_cfg.symbol_table)


def _timed(batches: Iterable[Batch]) -> tuple[float, int, int]:
    start = time.perf_counter()
    utts = frames = 0
    for b in batches:
        utts += len(b)
        frames += int(b.feats_lengths.sum())
    return time.perf_counter() - start, utts, frames


def throughput(shard_list: str, units: str, repeats: int) -> dict:
    """Best-of-``repeats`` epoch time of both pipelines in this process (one worker, one thread)."""
    torch.set_num_threads(1)
    cfg = bench_config(shard_list, units)
    tokenizer = Tokenizer.from_config(cfg.tokenizer)
    shards = read_shard_list(shard_list)
    audio_s = sum(sf.info(io.BytesIO(s["audio"])).duration for s in ref_tar(shards))
    loader = AsrDataLoader(shards, cfg, tokenizer, rank=0, world_size=1)
    ours, ref = [], []
    for r in range(repeats + 1):  # the first round warms caches (page cache, resampling kernels)
        loader.set_epoch(r)
        t_ours, n_ours, _ = _timed(loader)
        t_ref, n_ref, _ = _timed(reference_pipeline(shards, cfg, tokenizer, True, seed=r))
        if r:
            ours.append(t_ours)
            ref.append(t_ref)
    assert n_ours == n_ref, f"pipelines disagree on the utterance count: {n_ours} vs {n_ref}"
    t_ours, t_ref = min(ours), min(ref)
    return {"utterances": n_ours, "audio_hours": audio_s / 3600,
            "ours_utt_per_s": n_ours / t_ours, "ours_audio_h_per_s": audio_s / 3600 / t_ours,
            "wenet_style_utt_per_s": n_ref / t_ref, "wenet_style_audio_h_per_s": audio_s / 3600 / t_ref,
            "speedup": t_ref / t_ours, "ours_s": ours, "wenet_style_s": ref}


def trainer_wait(shard_list: str, units: str, train_config: str, steps: int, num_workers: int) -> dict:
    """Train the config's model on the loader's batches; time spent blocked on the loader vs the steps."""
    from moe_asr.run.config import load_config
    from moe_asr.model.u2pp import build_model
    torch.manual_seed(0)
    cfg = replace(bench_config(shard_list, units), num_workers=num_workers)
    tokenizer = Tokenizer.from_config(cfg.tokenizer)
    model_cfg = replace(load_config(train_config).model, vocab_size=tokenizer.vocab_size, cmvn=None)
    model = build_model(model_cfg)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = AsrDataLoader(shard_list, cfg, tokenizer, rank=0, world_size=1)
    waits, computes = [], []
    epoch = 0
    while len(computes) < steps:
        loader.set_epoch(epoch)
        it = iter(loader)
        while len(computes) < steps:
            t0 = time.perf_counter()
            batch = next(it, None)
            t1 = time.perf_counter()
            if batch is None:
                break
            loss = model(batch.feats, batch.feats_lengths, batch.targets, batch.target_lengths)["loss"]
            optim.zero_grad()
            loss.backward()
            optim.step()
            waits.append(t1 - t0)
            computes.append(time.perf_counter() - t1)
        epoch += 1
    steady = slice(2, None)  # the first batches include worker start-up
    return {"steps": steps, "num_workers": num_workers, "torch_threads": torch.get_num_threads(),
            "first_wait_s": sum(waits[:2]), "step_ms": 1000 * statistics.mean(computes[steady]),
            "wait_ms": 1000 * statistics.mean(waits[steady]),
            "wait_fraction": sum(waits[steady]) / (sum(waits[steady]) + sum(computes[steady]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.splitlines()[0])
    p.add_argument("--shards", help="shard list (default: built from FSDD)")
    p.add_argument("--fsdd", type=Path, default=FSDD, help="FSDD recordings folder (default: %(default)s)")
    p.add_argument("--units", help="symbol table for --shards")
    p.add_argument("--utts", type=int, default=600, help="utterances built from FSDD")
    p.add_argument("--concat", type=int, default=1, help="FSDD recordings joined per utterance")
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-config", help="also measure trainer wait with this config's model (conf/tiny_moe.yaml)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers for the trainer-wait run")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            shard_list, units = args.shards, args.units
            if not units:
                p.error("--units is required with --shards")
        else:
            fsdd = args.fsdd.resolve()
            if not fsdd.is_dir():
                raise SystemExit(f"{p.prog}: FSDD recordings not found at {fsdd}: pass --fsdd DIR or --shards")
            shard_list, units = make_fsdd_shards(fsdd, Path(tmp), args.utts, args.concat, args.per_shard)
        result = {"throughput": throughput(shard_list, units, args.repeats)}
        if args.train_config:
            result["trainer"] = trainer_wait(shard_list, units, args.train_config, args.steps, args.num_workers)
    t = result["throughput"]
    print(f"{t['utterances']} utterances, {t['audio_hours'] * 3600:.0f} s of audio, one worker, one thread")
    print(f"  moe_asr pipeline : {t['ours_utt_per_s']:8.1f} utt/s {t['ours_audio_h_per_s']:8.4f} audio h/s")
    print(f"  WeNet-style chain: {t['wenet_style_utt_per_s']:8.1f} utt/s {t['wenet_style_audio_h_per_s']:8.4f} "
          f"audio h/s")
    print(f"  speedup: {t['speedup']:.2f}x")
    if "trainer" in result:
        r = result["trainer"]
        print(f"  trainer ({r['num_workers']} worker(s)): step {r['step_ms']:.0f} ms, waiting on data "
              f"{r['wait_ms']:.1f} ms/step ({100 * r['wait_fraction']:.1f}% of the time), "
              f"start-up wait {r['first_wait_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
