"""The loader the trainer iterates: DataLoader workers in a fixed order, resumable, equal steps on all ranks.

Three guarantees on top of ``torch.utils.data.DataLoader``:

* Order. Batches come round-robin over the workers starting from a recorded
  worker, so a resumed epoch continues the exact sequence of the interrupted one.
* Resume. ``state_dict()`` records, per worker, how many planned batches were
  delivered (plus shards done / samples read for humans); ``load_state_dict()``
  makes the next ``__iter__`` replay only the cheap planning of those batches.
  Nothing is repeated and nothing skipped.
* Uneven ranks (training). Shards rarely split into equal batch counts, and a
  rank that stops early would leave the others blocked in a collective. With
  torch.distributed initialised, every step the ranks agree (all-reduce MIN
  over gloo) whether all still have a batch; the epoch ends for everyone at
  the first rank that runs out. The shards that do not divide over the ranks
  are shared sample by sample (``pipeline.worker_shards``), so the ranks' shares
  differ by at most a few utterances and only the batches that equal steps
  force out are dropped; the other ranks read theirs to the end to count them
  (``skipped``). They differ every epoch because the shard order is reshuffled. The CV loader (``build_loader``
  with ``"cv"``) does not do this: each rank reads all its data, and the
  training loop keeps the ranks' forwards in step instead.

Skip counts (``skipped``) are per epoch: the workers count what they skip and
send the counts with every batch; the loader keeps the latest of each worker
in its state, so a resumed epoch continues the interrupted epoch's counts.
The workers log the first few bad samples by key on the loader's first pass
only (later epochs read the same samples again); reporting the counts per
epoch is the training loop's job.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections import Counter, deque
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from moe_asr.data.batch import Batch
from moe_asr.data.config import DataConfig
from moe_asr.data.pipeline import Pipeline, ShardDataset, WorkerItem
from moe_asr.data.shards import check_shards_exist, is_raw_entry, read_shard_list
from moe_asr.data.stats import UNEVEN_RANKS
from moe_asr.data.tokenizer import Tokenizer
from moe_asr.lifetime import EndWithParent
from moe_asr.schema import ConfigError

log = logging.getLogger(__name__)
STATE_VERSION = 2
_gloo_group: Any = None


def _keep(item: WorkerItem) -> WorkerItem:
    return item


def rank_and_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """Explicit values, else torch.distributed, else the RANK/WORLD_SIZE launcher variables, else 0/1."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _sync_group() -> Any:
    """A gloo group for the per-step agreement (CPU tensors, whatever the training backend is)."""
    global _gloo_group
    if _gloo_group is None:
        _gloo_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _gloo_group


def _all_have_batch(have: bool, group: Any) -> bool:
    flag = torch.tensor([1 if have else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


class AsrDataLoader:
    """Batches of this rank's share of the shards, for one epoch per ``iter()``.

    ``train``: the ``data.train_shards`` loader (shuffling and augmentation on),
    else the ``data.cv_shards`` one; errors about the list name it so.
    """

    def __init__(self, shards: Sequence[str] | str | Path, cfg: DataConfig, tokenizer: Tokenizer,
                 train: bool = True, rank: Optional[int] = None, world_size: Optional[int] = None,
                 sync_ranks: bool = True):
        self.shards = read_shard_list(shards) if isinstance(shards, (str, Path)) else list(shards)
        if not self.shards:
            raise ValueError("the shard list is empty")
        check_shards_exist(self.shards)
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self.cfg = cfg
        self.train = train
        self._check_shard_count(shards)
        self.sync_ranks = sync_ranks
        self.pipeline = Pipeline(cfg, tokenizer, train)
        self.epoch = 0
        self._fingerprint = hashlib.sha1("\n".join(self.shards).encode()).hexdigest()[:16]
        self._state = self._fresh_state()
        self._resume: Optional[dict] = None
        self._first_pass = True

    @property
    def num_worker_streams(self) -> int:
        return max(1, self.cfg.num_workers)

    def _check_shard_count(self, shards: Sequence[str] | str | Path) -> None:
        """Refuse a list with fewer shards than ranks (a rank would get none), warn when workers would idle."""
        name = f"data.{'train' if self.train else 'cv'}_shards"
        if isinstance(shards, (str, Path)):
            name += f" ({shards})"
        workers = self.num_worker_streams
        if len(self.shards) < self.world_size:
            raise ConfigError(f"{name}: {len(self.shards)} shard(s) cannot feed {self.world_size} ranks; write at "
                              f"least ranks x DataLoader workers = {self.world_size * workers} shards, ideally "
                              f"many more (`moe-asr make-shards --per-shard N` with a smaller N)")
        per_rank, extra = divmod(len(self.shards), self.world_size)
        if extra and not is_raw_entry(self.shards[0]):
            log.warning("%s: %d shards over %d ranks: every rank reads the headers of %d shard(s) to take its "
                        "share of their samples; write a multiple of %d shards to read each shard once",
                        name, len(self.shards), self.world_size, extra, self.world_size)
        if per_rank < workers:
            log.warning("%s: only %d shard(s) per rank for %d DataLoader workers: some workers will idle",
                        name, per_rank, workers)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order, shuffles, augmentation); a loaded position of another epoch is dropped."""
        self.epoch = epoch
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None

    @property
    def skipped(self) -> dict[str, int]:
        """Utterances skipped, filtered or dropped on this rank in the current epoch so far, by reason.

        Only reasons that occurred are listed. ``dropped: uneven ranks`` counts
        the utterances of the batches this rank still had when another rank ran
        out of data.
        """
        total = Counter({UNEVEN_RANKS: self._state["dropped"]})
        for worker in self._state["workers"]:
            total.update(worker["skipped"])
        return {reason: n for reason, n in total.items() if n}

    # ------------------------------------------------------------------ resume
    def _fresh_state(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.cfg.num_workers, "seed": self.cfg.seed, "shards": self._fingerprint,
                "complete": False, "batches_delivered": 0, "next_worker": 0, "dropped": 0,
                "workers": [{"batches": 0, "done": False, "shards_done": 0, "samples_in_shard": 0, "skipped": {}}
                            for _ in range(self.num_worker_streams)]}

    def state_dict(self) -> dict:
        """Position after the last delivered batch (JSON-serialisable); save it with each checkpoint."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state`` on the next ``iter()``: same epoch, continuing after its last batch."""
        expected = self._fresh_state()
        for key in ("version", "rank", "world_size", "num_workers", "seed", "shards"):
            if state.get(key) != expected[key]:
                raise ValueError(f"cannot resume the data loader: {key} was {state.get(key)!r}, now "
                                 f"{expected[key]!r} (resume needs the same shards, seed, ranks and workers)")
        self.epoch = int(state["epoch"])
        self._resume = copy.deepcopy(state)
        self._state = copy.deepcopy(state)

    # ------------------------------------------------------------------ iteration
    def _ordered(self, state: dict, log_details: bool) -> Iterator[Batch]:
        """Worker outputs in round-robin order from ``state['next_worker']``, updating ``state`` as they go."""
        workers = state["workers"]
        dataset = ShardDataset(self.shards, self.pipeline, self.cfg.seed, self.epoch, self.rank,
                               self.world_size, skip=[w["batches"] for w in workers],
                               skipped=[w["skipped"] for w in workers], log_details=log_details)
        k = self.cfg.num_workers
        loader = DataLoader(dataset, batch_size=None, num_workers=k, collate_fn=_keep,
                            worker_init_fn=EndWithParent() if k else None,
                            prefetch_factor=self.cfg.prefetch_factor if k else None,
                            pin_memory=self.cfg.pin_memory and torch.cuda.is_available())
        stream = iter(loader)
        queues: list[deque[WorkerItem]] = [deque() for _ in workers]
        w = state["next_worker"]
        while not all(x["done"] for x in workers):
            if workers[w]["done"]:
                w = (w + 1) % len(workers)
                continue
            while not queues[w]:
                item = next(stream)
                queues[item.worker].append(item)
            item = queues[w].popleft()
            workers[w].update(shards_done=item.position.shards_done,
                              samples_in_shard=item.position.samples_in_shard, skipped=item.stats)
            w = (w + 1) % len(workers)
            state["next_worker"] = w
            if item.batch is None:
                workers[item.worker]["done"] = True
                continue
            workers[item.worker]["batches"] = item.index + 1
            state["batches_delivered"] += 1
            yield item.batch

    def __iter__(self) -> Iterator[Batch]:
        resume, self._resume = self._resume, None
        self._state = state = resume if resume is not None else self._fresh_state()
        if state["complete"]:
            return
        log_details, self._first_pass = self._first_pass, False
        sync = self.sync_ranks and self.world_size > 1 and dist.is_available() and dist.is_initialized()
        group = _sync_group() if sync else None
        batches = self._ordered(state, log_details)
        for batch in batches:
            if sync and not _all_have_batch(True, group):
                trained = state["batches_delivered"] - 1
                state["dropped"] += len(batch) + sum(len(rest) for rest in batches)
                log.info("rank %d: epoch %d ends after %d batches: another rank ran out of data; %d of this "
                         "rank's utterances are not trained on this epoch", self.rank, self.epoch, trained,
                         state["dropped"])
                state["complete"] = True
                return
            yield batch
        if sync:
            _all_have_batch(False, group)
        state["complete"] = True


def build_loader(cfg: DataConfig, split: Literal["train", "cv"] = "train", tokenizer: Optional[Tokenizer] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None) -> AsrDataLoader:
    """The loader for ``data.train_shards`` (training randomness on) or ``data.cv_shards`` (off)."""
    shards = cfg.train_shards if split == "train" else cfg.cv_shards
    if shards is None:
        raise ValueError(f"data.{split}_shards is not set")
    tokenizer = tokenizer or Tokenizer.from_config(cfg.tokenizer)
    # CV reads every utterance of every rank (the training loop keeps the ranks' forwards in step);
    # training stops all ranks at the first one out of data, so that every step is a step of all.
    return AsrDataLoader(shards, cfg, tokenizer, train=split == "train", rank=rank, world_size=world_size,
                         sync_ranks=split == "train")
