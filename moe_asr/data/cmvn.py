"""Global CMVN statistics of the fbank features over shards, in WeNet's JSON format.

``{"mean_stat": [sum x], "var_stat": [sum x^2], "frame_num": N}`` per mel bin;
the encoder (``moe_asr.model.cmvn.GlobalCMVN.from_json``) normalises with
mean = sum/N and istd = 1/sqrt(sum x^2/N - mean^2).
Features are computed exactly as in training but without dither or augmentation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from moe_asr.data.audio import AudioError, decode_audio
from moe_asr.data.config import FeatureConfig
from moe_asr.data.features import Fbank, resample
from moe_asr.data.parallel import parallel_map
from moe_asr.data.shards import read_shard
from moe_asr.data.stats import DataStats

_CHUNK = 32  # utterances per fbank call


@dataclass
class CmvnStats:
    sum: np.ndarray
    sum_sq: np.ndarray
    frames: int = 0
    utterances: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def add(self, other: "CmvnStats") -> None:
        self.sum += other.sum
        self.sum_sq += other.sum_sq
        self.frames += other.frames
        self.utterances += other.utterances
        for k, v in other.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v

    def to_json(self) -> dict:
        return {"mean_stat": self.sum.tolist(), "var_stat": self.sum_sq.tolist(), "frame_num": self.frames}


def _empty(cfg: FeatureConfig) -> CmvnStats:
    return CmvnStats(np.zeros(cfg.num_mel_bins), np.zeros(cfg.num_mel_bins))


def _accumulate(stats: CmvnStats, fbank: Fbank, waves: list[torch.Tensor]) -> None:
    for f in fbank(waves):
        if f.shape[0] == 0:
            continue
        f64 = f.double()
        stats.sum += f64.sum(0).numpy()
        stats.sum_sq += f64.square().sum(0).numpy()
        stats.frames += f.shape[0]
        stats.utterances += 1


def shard_cmvn(shard: str, cfg: FeatureConfig) -> CmvnStats:
    """Sums over one shard (float64, so millions of frames add up exactly enough)."""
    torch.set_num_threads(1)
    stats, bad, fbank = _empty(cfg), DataStats(), Fbank(cfg)
    waves: list[torch.Tensor] = []
    for sample in read_shard(shard, bad):
        if sample.audio is None:
            bad.bad("missing audio", sample.key)
            continue
        try:
            wave, sr = decode_audio(sample.audio)
        except AudioError as e:
            bad.bad("undecodable audio", sample.key, str(e))
            continue
        if not np.isfinite(wave).all():
            bad.bad("non-finite features", sample.key)
            continue
        waves.append(resample(torch.from_numpy(wave), sr, cfg.sample_rate))
        if len(waves) == _CHUNK:
            _accumulate(stats, fbank, waves)
            waves = []
    if waves:
        _accumulate(stats, fbank, waves)
    stats.skipped = bad.as_dict()
    return stats


def _task(args: tuple[str, FeatureConfig]) -> CmvnStats:
    return shard_cmvn(*args)


def compute_cmvn(shards: Sequence[str], cfg: FeatureConfig, num_workers: int = 1,
                 on_done: Callable[[CmvnStats], None] | None = None) -> CmvnStats:
    """Sum the per-shard statistics computed by ``num_workers`` processes."""
    total = _empty(cfg)
    for result in parallel_map(_task, [(s, cfg) for s in shards], num_workers):
        total.add(result)
        if on_done:
            on_done(result)
    return total


def save_cmvn(stats: CmvnStats, path: str | Path) -> None:
    Path(path).write_text(json.dumps(stats.to_json()))
