"""What training reports: console progress, TensorBoard scalars, a JSON-lines metrics file, expert load.

Only rank 0 writes; the numbers it writes are already averaged (losses) or
summed (frames, routed tokens, skipped utterances) over all ranks by the loop.
``metrics.jsonl`` is the machine-readable record (the loss-curve plot and the
tests read it); on resume, records past the resumed step are dropped there and
in TensorBoard (``purge_step``), so a resumed run reads as one curve. The
epoch records kept there also carry the run's data-skip totals across a resume.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from moe_asr.data.stats import skip_line
from moe_asr.engine.expert_load import WindowLoad

log = logging.getLogger("moe_asr.train")
METRICS = "metrics.jsonl"
# The epoch record's skip counts, and how its warnings name the samples.
EPOCH_SKIPS = {"data_skipped_epoch": "samples", "cv_data_skipped": "CV samples"}


def setup_console(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere (one readable console for N ranks)."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def _tag(reason: str) -> str:
    """A skip reason as a TensorBoard tag part: ``filtered: tokens/frames ...`` -> ``filtered_tokens_frames_...``."""
    return re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a last line cut short (a run killed while writing it) is left out."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON record") from None
            log.warning("%s: the last record was cut short (the run was killed while writing it): left out", path)
    return records


class TrainLogger:
    def __init__(self, out_dir: Path, enabled: bool, layer_names: list[str], max_steps: int,
                 resume_step: int = 0) -> None:
        self.enabled = enabled
        self.layer_names = layer_names
        self.metrics_path = Path(out_dir) / METRICS
        self.writer = None
        self.bar: Optional[tqdm] = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= resume_step]
        tmp = self.metrics_path.with_name(METRICS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.metrics_path)
        # Epoch -> its latest epoch record: an epoch stopped by max_steps and finished after a
        # resume is reported twice, and its second report (the whole epoch) replaces the first.
        self.epochs = {r["epoch"]: r for r in kept if "data_skipped_epoch" in r}
        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)
        self.bar = tqdm(total=max_steps or None, initial=resume_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    def _record(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, step: int, epoch: int, losses: dict[str, float], lr: float, frames: float, seconds: float,
              skipped: int, load: WindowLoad, data_skipped: dict[str, int]) -> None:
        """One log interval: mean losses, LR, throughput, skipped steps, per MoE layer the routed tokens,
        entropy, max/mean load and (expert parallelism) each rank's share of the expert rows, and the
        utterances the data loaders skipped in this epoch so far, by reason."""
        if not self.enabled:
            return
        frames_per_s = frames / seconds
        balance = {}
        if self.layer_names:
            balance["moe_max_mean"] = dict(zip(self.layer_names, load.max_mean.tolist()))
            if load.rank_share is not None:
                balance["moe_rank_share"] = dict(zip(self.layer_names, load.rank_share.tolist()))
        self._record({"step": step, "epoch": epoch, **losses, "lr": lr, "frames": frames, "seconds": seconds,
                      "frames_per_s": frames_per_s, "skipped": skipped, "data_skipped": data_skipped, **balance})
        for name, value in {**losses, "lr": lr, "frames_per_s": frames_per_s, "skipped_steps": skipped}.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        for reason, n in data_skipped.items():
            self.writer.add_scalar(f"data/skipped_{_tag(reason)}", n, step)
        for i, name in enumerate(self.layer_names):
            self.writer.add_scalar(f"moe_entropy/{name}", load.entropy[i].item(), step)
            self.writer.add_scalar(f"moe_max_mean/{name}", load.max_mean[i].item(), step)
            for e, n in enumerate(load.tokens[i].tolist()):
                self.writer.add_scalar(f"moe_tokens/{name}/expert_{e}", n, step)
            for r, share in enumerate([] if load.rank_share is None else load.rank_share[i].tolist()):
                self.writer.add_scalar(f"moe_rank_share/{name}/rank_{r}", share, step)
        parts = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in losses.items() if k.startswith("loss_"))
        line = (f"epoch {epoch} step {step} loss {losses['loss']:.4f} ({parts}) lr {lr:.3e} "
                f"{frames_per_s:.0f} frames/s")
        if self.layer_names:  # the worst layer: its busiest expert, and the busiest expert-parallel rank
            line += f" load max/mean {load.max_mean.max().item():.2f}"
            if load.rank_share is not None:
                line += f" busiest rank {load.rank_share.max().item():.0%}"
        line += f" skipped {skipped}"
        if any(data_skipped.values()):
            line += f" skipped data {skip_line(data_skipped)}"
        if self.bar is not None and not self.bar.disable:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(line)
        log.info(line)

    def cv(self, step: int, epoch: int, losses: dict[str, float], utterances: int) -> None:
        """Mean CV losses and the number of CV utterances they are over (all ranks)."""
        if not self.enabled:
            return
        self._record({"step": step, "epoch": epoch, **{f"cv_{k}": v for k, v in losses.items()},
                      "cv_utterances": utterances})
        for name, value in losses.items():
            self.writer.add_scalar(f"cv/{name}", value, step)
        log.info("epoch %d step %d CV loss %.4f (%s)", epoch, step, losses["loss"],
                 " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in losses.items() if k != "loss"))

    def epoch_data(self, step: int, epoch: int, train: dict[str, int], cv: dict[str, int]) -> None:
        """The samples the train and CV loaders skipped in one epoch (all ranks, by reason): an ``epoch``
        record, a summary line, and one warning per reason that occurred, with the run's total."""
        if not self.enabled:
            return
        record = {"step": step, "epoch": epoch, "data_skipped_epoch": train, "cv_data_skipped": cv}
        self._record(record)
        self.epochs[epoch] = record
        log.info("epoch %d data skipped: train %s, CV %s", epoch, skip_line(train), skip_line(cv))
        for key, samples in EPOCH_SKIPS.items():
            for reason, n in record[key].items():
                if n:
                    total = sum(r[key].get(reason, 0) for r in self.epochs.values())
                    log.warning("epoch %d: %d %s skipped: %s (%d in this run)", epoch, n, samples, reason, total)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
