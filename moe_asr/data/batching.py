"""Buffers and batchers over planned utterances, and padding into tensors.

These stages only look at ``num_frames`` (known from the audio header), never
at features, so the batches of an epoch are planned before any decoding and a
resumed run can replay the plan cheaply.
"""
from __future__ import annotations

import random
from typing import Iterable, Iterator, Protocol, Sequence, TypeVar

import torch

from moe_asr.data.config import BatchConfig


class HasFrames(Protocol):
    num_frames: int


T = TypeVar("T", bound=HasFrames)


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Once ``size`` items are buffered, each new item replaces and releases a random one."""
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def sort_buffer(items: Iterable[T], size: int) -> Iterator[T]:
    """Sort each run of ``size`` items by length, so batches hold similar lengths (less padding)."""
    buf: list[T] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            buf.sort(key=lambda x: x.num_frames)
            yield from buf
            buf = []
    buf.sort(key=lambda x: x.num_frames)
    yield from buf


def static_batches(items: Iterable[T], batch_size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def dynamic_batches(items: Iterable[T], max_frames: int) -> Iterator[list[T]]:
    """Batches whose padded size (count x longest) stays within ``max_frames``.

    Items longer than ``max_frames`` must be filtered out before (the config
    check ``filters.max_frames <= max_frames_in_batch`` guarantees it).
    """
    batch: list[T] = []
    longest = 0
    for item in items:
        new_longest = max(longest, item.num_frames)
        if batch and new_longest * (len(batch) + 1) > max_frames:
            yield batch
            batch, new_longest = [], item.num_frames
        batch.append(item)
        longest = new_longest
    if batch:
        yield batch


def make_batches(items: Iterable[T], cfg: BatchConfig) -> Iterator[list[T]]:
    if cfg.batch_type == "static":
        return static_batches(items, cfg.batch_size)
    return dynamic_batches(items, cfg.max_frames_in_batch)


def pad(seqs: Sequence[torch.Tensor], value: float) -> torch.Tensor:
    """Stack [L_i, ...] tensors into [B, max L, ...] filled with ``value`` past each length."""
    if not seqs:
        raise ValueError("nothing to pad")
    longest = max(s.shape[0] for s in seqs)
    out = seqs[0].new_full((len(seqs), longest, *seqs[0].shape[1:]), value)
    for i, s in enumerate(seqs):
        out[i, :s.shape[0]] = s
    return out
