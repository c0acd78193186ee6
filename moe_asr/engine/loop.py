"""The training loop: epochs of DeepSpeed steps, CV each epoch, checkpoints, non-finite guard, logging.

Every decision that changes collective calls (skip a micro-batch, stop, save)
is taken from all-reduced values, so the ranks never disagree and block.

Non-finite values: a non-finite loss on any rank drops that micro-batch on all
ranks before backward; a non-finite gradient makes the optimizer skip the step
(fp16: DeepSpeed's loss scaler; fp32/bf16 ZeRO 1/2: DeepSpeed's overflow check;
ZeRO 0: ``Stage0AdamW``), counted in ``engine.skipped_steps``. Both count
towards ``max_consecutive_nonfinite``.

CV runs under a forked RNG, seeded before each batch from the run's seed and
the batch's utterance keys: the dynamic-chunk draw of a CV batch is the same
in every epoch and whichever rank computes it in whatever order (so the same
batches give the same CV loss at any world size), and evaluating does not
disturb the training RNG, so a run that stopped (and evaluated) mid-epoch
resumes on exactly the path of one that did not stop.
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from moe_asr.run.config import ExperimentConfig
from moe_asr.data.batch import Batch, filler_batch
from moe_asr.data.loader import AsrDataLoader
from moe_asr.data.pipeline import seed_for
from moe_asr.data.stats import SKIP_REASONS
from moe_asr.engine import plots
from moe_asr.engine.checkpoint import CheckpointInfo, Checkpointer, set_rng_state
from moe_asr.engine.deepspeed_engine import TrainingModel
from moe_asr.engine.distributed import DistInfo, all_reduce, all_reduce_named
from moe_asr.engine.expert_load import ExpertLoad
from moe_asr.engine.logging import TrainLogger, read_metrics
from moe_asr.engine.training_state import TrainingState
from moe_asr.model.u2pp import LOSS_KEYS

log = logging.getLogger("moe_asr.train")


def _rng_neutral(batches: Iterable[Batch]) -> Iterator[Batch]:
    """``batches`` without their effect on the global RNG.

    A torch DataLoader draws its workers' base seed from the global RNG when it
    starts; a resumed run starts its loader mid-epoch, after the RNG restore,
    so without this its dropout and chunk draws would be shifted by one.
    """
    it = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


def _skip_vector(loader: AsrDataLoader) -> torch.Tensor:
    """A loader's skip counts of the epoch so far in ``SKIP_REASONS`` order, to be summed over the ranks."""
    counts = loader.skipped
    return torch.tensor([counts.get(r, 0) for r in SKIP_REASONS])


def _skip_counts(summed: torch.Tensor) -> dict[str, int]:
    """Summed counts back to every reason by name (zeros included)."""
    return dict(zip(SKIP_REASONS, summed.long().tolist()))


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class LoopState:
    epoch: int = 0               # the epoch in progress (or the next to start)
    step: int = 0                # optimizer steps taken (skipped ones included, as DeepSpeed counts)
    nonfinite_losses: int = 0    # micro-batches dropped for a non-finite loss
    consecutive_nonfinite: int = 0


class _Window:
    """Loss and throughput sums over one log interval, on this rank."""

    def __init__(self, device: torch.device) -> None:
        self.losses = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
        self.batches = 0
        self.frames = 0
        self.start = time.perf_counter()

    def pack(self) -> dict[str, torch.Tensor]:
        """The sums by name, to be summed over the ranks."""
        return {"losses": self.losses, "batches": torch.tensor(self.batches), "frames": torch.tensor(self.frames)}


class Trainer:
    def __init__(self, cfg: ExperimentConfig, tm: TrainingModel, train_loader: AsrDataLoader,
                 cv_loader: AsrDataLoader, out_dir: Path, info: DistInfo, fingerprint: dict,
                 checkpointer: Checkpointer) -> None:
        self.cfg, self.tm, self.info = cfg, tm, info
        self.engine = tm.engine
        self.train_loader, self.cv_loader = train_loader, cv_loader
        self.out_dir = Path(out_dir)
        self.checkpointer = checkpointer
        self.fingerprint = fingerprint  # what every checkpoint of this run records (engine/fingerprint.py)
        self.state = LoopState()
        self.layer_names = list(tm.moe_layers)
        self.dtype = next(tm.model.parameters()).dtype
        self.expert_load = ExpertLoad(tm.moe_layers, cfg.model.moe.num_experts, info.device, cfg.parallel.ep_size,
                                      cfg.model.moe.bias_update_rate)
        self.logger: Optional[TrainLogger] = None

    # ------------------------------------------------------------------ state
    def resume(self, tag: str) -> None:
        self._restore(self.checkpointer.load(self.engine, tag))
        log.info("resumed from %s: epoch %d, step %d", tag, self.state.epoch, self.state.step)

    def _restore(self, state: dict) -> None:
        """This rank's loop counters, loader position, expert-load totals and RNG, as a checkpoint holds them."""
        self.state = LoopState(**state["loop"])
        self.train_loader.load_state_dict(state["loader"])
        self.expert_load.load_state_dict(state)
        set_rng_state(state["rng"])

    def continue_from(self, ts: TrainingState) -> None:
        """Continue a run from its layout-free training state (the engine already holds its optimizer state).

        At the old world size each rank takes its old rank's loader position and
        RNG, so the run goes on exactly as it would have; at another world size
        the shards are split differently, so the interrupted epoch starts again
        from its beginning with this run's seeds (and rank 0 carries the expert-load totals).
        """
        if len(ts.ranks) == self.info.world_size:
            self._restore(ts.ranks[self.info.rank])
            return
        self.state = LoopState(**ts.loop)
        if self.info.is_main:
            self.expert_load.load_state_dict({"expert_tokens": sum(r["expert_tokens"] for r in ts.ranks)})
        log.warning("the training state comes from %d rank(s), this run has %d: epoch %d restarts from its "
                    "first batch (steps and schedule continue from step %d)", len(ts.ranks), self.info.world_size,
                    self.state.epoch, self.state.step)

    def _save(self, tag: str, epoch: int, cv_loss: Optional[float]) -> None:
        self.checkpointer.save(self.engine, CheckpointInfo(tag, self.state.step, epoch, cv_loss),
                               {"loop": asdict(self.state), "loader": self.train_loader.state_dict(),
                                **self.expert_load.state_dict()}, self.fingerprint)
        log.info("saved checkpoint %s", tag)

    def _done(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.state.step

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        """Train until max_epochs or max_steps; CV and a checkpoint at each epoch end and at the stop."""
        t, s = self.cfg.train, self.state
        self.logger = TrainLogger(self.out_dir, self.info.is_main, self.layer_names, t.max_steps, s.step)
        try:
            while s.epoch < t.max_epochs and not self._done():
                epoch = s.epoch
                self.train_loader.set_epoch(epoch)
                completed = self._train_epoch()
                cv = self.evaluate()
                self.logger.cv(s.step, epoch, cv, self.cv_utterances)
                if completed:
                    s.epoch += 1
                self._save(f"epoch_{epoch}" if completed else f"step_{s.step}", epoch, cv["loss"])
            self._finish()
        finally:
            self.logger.close()

    def _train_epoch(self) -> bool:
        """One pass over the training data; False if max_steps stopped it early."""
        t, s = self.cfg.train, self.state
        self.engine.train()
        window = self._new_window()
        stopped = False
        for batch in _rng_neutral(self.train_loader):
            if not self._micro_step(batch, window):
                continue
            if s.step % t.log_interval == 0:
                self._log(window)
                window = self._new_window()
            if self._done():
                stopped = True
                break
            if t.checkpoint_interval and s.step % t.checkpoint_interval == 0:
                started = time.perf_counter()
                self._save(f"step_{s.step}", s.epoch, None)
                window.start += time.perf_counter() - started  # frames/s counts training time only
        if window.batches:
            self._log(window)
        return not stopped

    def _new_window(self) -> _Window:
        self.expert_load.reset_window()
        return _Window(self.info.device)

    def _micro_step(self, batch: Batch, window: _Window) -> bool:
        """Forward, backward and (at accumulation boundaries) an optimizer step; True after an optimizer step."""
        s = self.state
        batch = batch.to(self.info.device)
        out = self.engine(batch.feats.to(self.dtype), batch.feats_lengths, batch.targets, batch.target_lengths)
        finite = all_reduce(torch.isfinite(out["loss"].detach()).float().reshape(1), dist.ReduceOp.MIN)
        if not bool(finite.item()):
            s.nonfinite_losses += 1
            self._nonfinite(f"non-finite loss on a micro-batch at step {s.step}")
            return False
        self.expert_load.record()  # a dropped micro-batch routes nothing that counts
        self.engine.backward(out["loss"])
        steps, skipped = self.engine.global_steps, self.engine.skipped_steps
        self.engine.step()
        window.losses += torch.stack([out[k].detach().double() for k in LOSS_KEYS])
        window.batches += 1
        window.frames += int(batch.feats_lengths.sum())
        if self.engine.global_steps == steps:
            return False
        self.expert_load.end_step()  # the expert biases move after the step, from all its micro-batches
        s.step = self.engine.global_steps
        if self.engine.skipped_steps > skipped:
            self._nonfinite(f"non-finite gradient at step {s.step}")
        else:
            s.consecutive_nonfinite = 0
        return True

    def _nonfinite(self, what: str) -> None:
        s = self.state
        s.consecutive_nonfinite += 1
        log.warning("%s: skipped (%d in a row)", what, s.consecutive_nonfinite)
        if s.consecutive_nonfinite >= self.cfg.train.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{s.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient (last: {what}); "
                f"lower train.lr, raise train.warmup_steps, or check the data (train.max_consecutive_nonfinite="
                f"{self.cfg.train.max_consecutive_nonfinite})")

    def _log(self, window: _Window) -> None:
        """Sum the window and the data loaders' skip counts over the ranks and hand rank 0 the
        means (losses, entropy) and sums (frames, tokens, skips of the epoch so far)."""
        sums = all_reduce_named({**window.pack(), **self.expert_load.pack(),
                                 "data_skipped": _skip_vector(self.train_loader)}, self.info.device)
        batches = sums["batches"].item()
        losses = {k: v / max(batches, 1) for k, v in zip(LOSS_KEYS, sums["losses"].tolist())}
        load = self.expert_load.unpack(sums, batches)
        data_skipped = _skip_counts(sums["data_skipped"])
        elapsed = time.perf_counter() - window.start
        self.logger.train(self.state.step, self.state.epoch, losses, self.engine.get_lr()[0], sums["frames"].item(),
                          elapsed, self.engine.skipped_steps + self.state.nonfinite_losses, load, data_skipped)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Utterance-weighted mean CV losses over all ranks, every CV utterance of every rank counted.

        The CV loader does not stop at the first rank out of data (training's equal-step rule): each
        rank reads all of its shards. With expert parallelism every forward is a collective (the
        all-to-alls), so a rank that has finished runs a weightless filler batch for as long as any
        rank still has one. CV closes every epoch (and the stop at max_steps), so its collective also
        sums both loaders' skip counts of the epoch for the epoch's data report.
        """
        self.engine.eval()
        sums = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64, device=self.info.device)
        devices = [self.info.device] if self.info.device.type == "cuda" else []
        lockstep = self.cfg.parallel.ep_size > 1
        with torch.random.fork_rng(devices=devices):
            batches = iter(self.cv_loader)
            while True:
                batch = next(batches, None)
                if lockstep:
                    if not all_reduce(torch.tensor([batch is not None], dtype=torch.int32, device=self.info.device),
                                      dist.ReduceOp.MAX).item():
                        break
                elif batch is None:
                    break
                real = batch is not None
                batch = (batch if real else filler_batch(self.cfg.model.input_dim)).to(self.info.device)
                torch.manual_seed(seed_for(self.cfg.train.seed, zlib.crc32("\n".join(batch.keys).encode())))
                out = self.engine(batch.feats.to(self.dtype), batch.feats_lengths, batch.targets,
                                  batch.target_lengths)
                if real:
                    n = len(batch)
                    sums[:-1] += torch.stack([out[k].double() * n for k in LOSS_KEYS])
                    sums[-1] += n
        total = all_reduce_named({"cv": sums, "train_skipped": _skip_vector(self.train_loader),
                                  "cv_skipped": _skip_vector(self.cv_loader)}, self.info.device)
        self.logger.epoch_data(self.state.step, self.state.epoch, _skip_counts(total["train_skipped"]),
                               _skip_counts(total["cv_skipped"]))
        self.engine.train()
        cv = total["cv"]
        self.cv_utterances = int(cv[-1].item())
        return {k: (cv[i] / cv[-1].clamp_min(1)).item() for i, k in enumerate(LOSS_KEYS)}

    def _finish(self) -> None:
        tokens = self.expert_load.run_totals()
        if not self.info.is_main:
            return
        records = read_metrics(self.logger.metrics_path)
        if records:
            plots.loss_curves(records, self.out_dir / "loss_curves.png")
        if self.layer_names:
            plots.expert_load_heatmap(tokens, self.layer_names, self.out_dir / "expert_load.png",
                                      self.cfg.parallel.ep_size)
        best = self.checkpointer.best()
        log.info("done at step %d; best checkpoint %s (CV loss %.4f)", self.state.step,
                 best.tag if best else "-", best.cv_loss if best else float("nan"))
