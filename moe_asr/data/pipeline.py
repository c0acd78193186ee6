"""What one DataLoader worker runs: its shards -> planned batches -> padded feature batches.

The work is split in two on purpose. *Planning* reads the tar members and the
audio headers only: tokens, speed factor and frame count of every utterance,
then shuffle buffer, sort buffer and batching. *Materialising* decodes,
resamples and computes the features of one planned batch. All randomness
comes from (seed, epoch, rank, worker) for planning and (..., batch index) for
materialising, so the same seed and epoch give the same batches, and a resumed
run skips the batches it already trained on by replaying the cheap plan only.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from moe_asr.data.audio import AudioError, decode_audio, probe_audio
from moe_asr.data.batch import Batch
from moe_asr.data.batching import make_batches, pad, shuffle_buffer, sort_buffer
from moe_asr.data.config import DataConfig
from moe_asr.data.features import (Fbank, channel_eq, edge_crop, num_frames, resample, resampled_length,
                                    spec_augment, spec_sub)
from moe_asr.data.shards import RawSample, ShardPart, is_raw_entry, read_shard
from moe_asr.data.stats import DataStats
from moe_asr.data.tokenizer import Tokenizer
from moe_asr.symbols import IGNORE_ID


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (nearby epochs or ranks give unrelated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def worker_shards(shards: Sequence[str], seed: int, epoch: int, rank: int, world_size: int,
                  worker: int, num_workers: int, shuffle: bool) -> list[ShardPart]:
    """This worker's shards: the list shuffled per epoch (same order on every rank), then every
    ``world_size``-th shard for this rank, then every ``num_workers``-th of those for this worker.

    The last ``len % world_size`` tar shards of the order do not divide over the ranks: each rank
    takes every ``world_size``-th sample of them instead, so the ranks' shares differ by at most one
    utterance per such shard (whole shards would leave one rank a shard more, which training, stopping
    all ranks with the first one out of data, could not use). Every sample goes to exactly one
    (rank, worker), so no sample is read twice in an epoch. Raw data.list entries (one utterance each)
    are never split.
    """
    order = list(shards)
    if shuffle:
        random.Random(seed_for(seed, epoch)).shuffle(order)
    whole = len(order) - len(order) % world_size
    mine = [ShardPart(s) for s in order[rank:whole:world_size]]
    mine += [ShardPart(s) if is_raw_entry(s) else ShardPart(s, world_size, rank)
             for i, s in enumerate(order[whole:]) if not is_raw_entry(s) or i % world_size == rank]
    return mine[worker::num_workers]


@dataclass(slots=True)
class PlannedUtt:
    key: str
    audio: bytes
    source_rate: int
    source_samples: int
    tokens: list[int]
    speed: float
    warp: float  # VTLP factor of the mel bank
    num_frames: int


@dataclass
class Position:
    """How far a worker has read: whole shards done, samples read from the current one."""

    shards_done: int = 0
    samples_in_shard: int = 0


class Pipeline:
    """The stages of one worker, configured once from the data config."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, train: bool):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.train = train
        self.fbank = Fbank(cfg.features)

    # ------------------------------------------------------------------ planning
    def samples(self, shards: Sequence[str | ShardPart], stats: DataStats, pos: Position) -> Iterator[RawSample]:
        for shard in shards:
            pos.samples_in_shard = 0
            for sample in read_shard(shard, stats):
                pos.samples_in_shard += 1
                yield sample
            pos.shards_done += 1
            pos.samples_in_shard = 0

    def prepare(self, raw: RawSample, rng: random.Random, stats: DataStats) -> Optional[PlannedUtt]:
        """Tokens, speed and frame count from the transcript and the audio header; None if unusable."""
        if raw.audio is None:
            stats.bad("missing audio", raw.key)
            return None
        if raw.text is None:
            stats.bad("missing transcript", raw.key)
            return None
        try:
            info = probe_audio(raw.audio)
        except AudioError as e:
            stats.bad("undecodable audio", raw.key, str(e))
            return None
        if info.num_frames == 0:
            stats.bad("empty audio", raw.key)
            return None
        tokens = self.tokenizer.encode(raw.text)
        if self.tokenizer.no_known_token(tokens):
            stats.bad("no known token", raw.key, repr(raw.text[:50]))
            return None
        speeds, warps = self.cfg.features.speed_perturb, self.cfg.features.vtlp
        speed = rng.choice(speeds) if self.train and len(speeds) > 1 else 1.0
        warp = rng.choice(warps) if self.train and len(warps) > 1 else 1.0
        samples = resampled_length(info.num_frames, info.sample_rate, self.cfg.features.sample_rate, speed)
        frames = num_frames(samples, self.cfg.features)
        f = self.cfg.filters
        if not f.min_frames <= frames <= f.max_frames:
            stats.filtered("frames out of range")
        elif not f.min_tokens <= len(tokens) <= f.max_tokens:
            stats.filtered("tokens out of range")
        elif not f.min_output_input_ratio <= len(tokens) / frames <= f.max_output_input_ratio:
            stats.filtered("tokens/frames ratio out of range")
        else:
            return PlannedUtt(raw.key, raw.audio, info.sample_rate, info.num_frames, tokens, speed, warp, frames)
        return None

    def plan(self, shards: Sequence[str | ShardPart], rng: random.Random, stats: DataStats,
             pos: Position) -> Iterator[list[PlannedUtt]]:
        utts = (u for u in (self.prepare(s, rng, stats) for s in self.samples(shards, stats, pos)) if u)
        b = self.cfg.batching
        if self.train and b.shuffle:
            utts = shuffle_buffer(utts, b.shuffle_size, rng)
        if b.sort:
            utts = sort_buffer(utts, b.sort_size)
        return make_batches(utts, b)

    # ------------------------------------------------------------------ materialising
    def materialize(self, utts: Sequence[PlannedUtt], generator: torch.Generator,
                    stats: DataStats) -> Optional[Batch]:
        """Decode, resample (+speed), fbank (+VTLP), crop, augment and pad one planned batch; bad ones are dropped."""
        feat_cfg = self.cfg.features
        waves, kept = [], []
        for u in utts:
            try:
                wave, sr = decode_audio(u.audio)
            except AudioError as e:
                stats.bad("undecodable audio", u.key, str(e))
                continue
            if sr != u.source_rate:
                stats.bad("undecodable audio", u.key, f"header says {u.source_rate} Hz, decoded {sr} Hz")
                continue
            # Never longer than planned, so the batch's frame budget holds even if a header lied.
            expected = resampled_length(u.source_samples, sr, feat_cfg.sample_rate, u.speed)
            waves.append(resample(torch.from_numpy(wave), sr, feat_cfg.sample_rate, u.speed)[:expected])
            kept.append(u)
        feats = self.fbank(waves, feat_cfg.dither if self.train else 0.0, generator, [u.warp for u in kept])
        good = []
        for u, f in zip(kept, feats):
            if f.shape[0] == 0:
                stats.bad("empty audio", u.key, "shorter than one frame after decoding")
            elif not torch.isfinite(f).all():
                stats.bad("non-finite features", u.key)
            else:
                good.append((u, f))
        if not good:
            return None
        if self.train and self.cfg.edge_crop.enabled:
            cropped = edge_crop([f for _, f in good], self.cfg.edge_crop, self.cfg.filters.min_frames, generator)
            good = [(u, f) for (u, _), f in zip(good, cropped)]
        lengths = torch.tensor([f.shape[0] for _, f in good], dtype=torch.int64)
        x = pad([f for _, f in good], 0.0)
        if self.train and self.cfg.channel_eq.enabled:
            x = channel_eq(x, lengths, self.cfg.channel_eq, generator)
        if self.train and self.cfg.specaug.enabled:
            x = spec_augment(x, lengths, self.cfg.specaug, generator)
        if self.train and self.cfg.specsub.enabled:
            x = spec_sub(x, lengths, self.cfg.specsub, generator)
        targets = [torch.tensor(u.tokens, dtype=torch.int64) for u, _ in good]
        return Batch(keys=[u.key for u, _ in good], feats=x, feats_lengths=lengths,
                     targets=pad(targets, IGNORE_ID),
                     target_lengths=torch.tensor([len(t) for t in targets], dtype=torch.int64))


@dataclass
class WorkerItem:
    """What a worker sends to the loader: a batch with where it came from, or (batch None) 'I am done'."""

    worker: int
    index: int  # planned batch index within this worker's epoch
    position: Position
    stats: dict[str, int]
    batch: Optional[Batch]

    def pin_memory(self) -> "WorkerItem":
        """``DataLoader(pin_memory=True)`` pins the batch inside."""
        return replace(self, batch=self.batch.pin_memory() if self.batch is not None else None)


class ShardDataset(IterableDataset):
    """One epoch of one rank; each DataLoader worker takes its own shards (see :func:`worker_shards`).

    ``skip[w]`` planned batches of worker ``w`` are replayed without features
    (resume); ``skipped[w]`` are the skip counts it had sent with the last of
    them. The replay recounts the planning skips but cannot see the decoding
    ones, so at that batch the counts are set to the saved ones, which then
    continue as in the interrupted epoch. ``log_details``: log the first bad
    samples of each reason by key (see :class:`DataStats`). Ends every
    worker's stream with a ``WorkerItem`` whose batch is None.
    """

    def __init__(self, shards: Sequence[str], pipeline: Pipeline, seed: int, epoch: int, rank: int,
                 world_size: int, skip: Sequence[int] = (), skipped: Sequence[Mapping[str, int]] = (),
                 log_details: bool = True):
        super().__init__()
        self.shards = list(shards)
        self.pipeline = pipeline
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.skip = list(skip)
        self.skipped = list(skipped)
        self.log_details = log_details

    def __iter__(self) -> Iterator[WorkerItem]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shards = worker_shards(self.shards, self.seed, self.epoch, self.rank, self.world_size, worker,
                               num_workers, shuffle=self.pipeline.train)
        rng = random.Random(seed_for(self.seed, self.epoch, self.rank, worker))
        stats, pos = DataStats(self.log_details), Position()
        skip = self.skip[worker] if worker < len(self.skip) else 0
        for index, planned in enumerate(self.pipeline.plan(shards, rng, stats, pos)):
            if index < skip:
                if index == skip - 1:
                    stats.restore(self.skipped[worker])
                continue
            generator = torch.Generator().manual_seed(seed_for(self.seed, self.epoch, self.rank, worker, index))
            batch = self.pipeline.materialize(planned, generator, stats)
            if batch is not None:
                yield WorkerItem(worker, index, Position(pos.shards_done, pos.samples_in_shard),
                                 stats.as_dict(), batch)
        yield WorkerItem(worker, -1, Position(pos.shards_done, pos.samples_in_shard), stats.as_dict(), None)
