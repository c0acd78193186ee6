"""Audio items -> the model's features -> length-sorted, padded batches for recognition.

The features are those of training's evaluation data: resampled to the model's
``features.sample_rate`` and Kaldi fbank with the training settings, but no
dither, speed perturbation or SpecAugment (as WeNet's recognize). CMVN is not
applied here: it is inside the model. Utterances are sorted by length within
windows of ``sort_window`` and packed into batches of at most ``max_frames``
padded frames, so little compute goes to padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

from moe_asr.data.batching import dynamic_batches, pad, sort_buffer
from moe_asr.data.config import FeatureConfig
from moe_asr.data.features import Fbank, resample
from moe_asr.data.sources import AudioItem, Item, Skip

# Utterances sorted together: enough for near-uniform batches, bounded memory for any input size.
SORT_WINDOW = 1000


@dataclass
class _Features:
    key: str
    feats: torch.Tensor    # [T, num_mel_bins]
    num_frames: int
    seconds: float         # audio duration at the source rate
    text: Optional[str]


@dataclass
class FeatureBatch:
    keys: list[str]
    feats: torch.Tensor            # [B, T, num_mel_bins], zero-padded
    feats_lengths: torch.Tensor    # [B] int64
    seconds: float                 # audio in the batch
    texts: list[Optional[str]]     # references, None where the input had none


def utterance_features(item: AudioItem, fbank: Fbank) -> torch.Tensor:
    """``[T, num_mel_bins]`` model input of one utterance (any source rate; no dither)."""
    wave = resample(torch.from_numpy(item.wave), item.sample_rate, fbank.cfg.sample_rate)
    return fbank([wave], dither=0.0)[0]


def feature_batches(items: Iterable[Item], cfg: FeatureConfig, max_frames: int,
                    on_skip: Callable[[Skip], None], sort_window: int = SORT_WINDOW) -> Iterator[FeatureBatch]:
    """Batches of the readable utterances of ``items``; every :class:`Skip` (the source's, and
    utterances shorter than one frame or with non-finite features) goes to ``on_skip``.
    An utterance longer than ``max_frames`` is a batch of its own."""
    fbank = Fbank(cfg)

    def featurized() -> Iterator[_Features]:
        for item in items:
            if isinstance(item, Skip):
                on_skip(item)
                continue
            feats = utterance_features(item, fbank)
            if feats.shape[0] == 0:
                on_skip(Skip(item.key, "empty audio", "shorter than one frame", item.text))
            elif not torch.isfinite(feats).all():
                on_skip(Skip(item.key, "non-finite features", "", item.text))
            else:
                yield _Features(item.key, feats, feats.shape[0], item.wave.size / item.sample_rate, item.text)

    for batch in dynamic_batches(sort_buffer(featurized(), sort_window), max_frames):
        yield FeatureBatch(keys=[u.key for u in batch], feats=pad([u.feats for u in batch], 0.0),
                           feats_lengths=torch.tensor([u.num_frames for u in batch], dtype=torch.int64),
                           seconds=sum(u.seconds for u in batch), texts=[u.text for u in batch])
