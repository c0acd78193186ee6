"""A small MoE model learns real speech: a few hundred 2-rank expert-parallel steps on FSDD.

Four speakers train (george and yweweler are held out entirely); the CV set
is other recordings of the training speakers. The model is the test model
(every FFN a 4-expert MoE, ep_size 2): the tiny config trains the same way in
docs/training.md but takes longer than a test should. The shortest recordings
are filtered out, so the run also shows how skipped data is reported.
"""
from __future__ import annotations

import logging

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_asr.data.stats import SKIP_REASONS
from moe_asr.engine.expert_load import WindowLoad
from moe_asr.engine.logging import TrainLogger
from tests.engine.conftest import SMALL_MODEL, build_corpus, data_overrides, read_metrics, run_training, train_cmd

SHORT = "filtered: frames out of range"


@pytest.mark.slow
def test_cv_loss_falls_on_real_audio(tmp_path_factory):
    corpus = build_corpus(tmp_path_factory.mktemp("fsdd"), range(0, 30), range(45, 47), 50)
    out = tmp_path_factory.mktemp("train")
    overrides = {**SMALL_MODEL, **data_overrides(corpus, max_frames=1500), "parallel.ep_size": 2,
                 "data.filters.min_frames": 20,  # about 1% of these recordings are shorter
                 "train.max_steps": 240, "train.lr": 0.004, "train.warmup_steps": 40, "train.log_interval": 20}
    console = run_training(train_cmd(corpus, out, "ds_configs/zero1_cpu.json", overrides, 29651), timeout=600).stdout
    records = read_metrics(out)
    cv = [r["cv_loss"] for r in records if "cv_loss" in r]
    train = [r["loss"] for r in records if "loss" in r]
    assert len(cv) >= 5
    assert cv[-1] < 0.5 * cv[0], cv
    assert train[-1] < 0.5 * train[0], train
    assert (out / "expert_load.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0
    assert any((out / "tensorboard").iterdir())
    # Data skip counts of all ranks, every reason, cumulative within an epoch.
    logged = [r for r in records if "loss" in r]
    assert all(list(r["data_skipped"]) == list(SKIP_REASONS) for r in logged)
    for before, after in zip(logged, logged[1:]):
        if before["epoch"] == after["epoch"]:
            assert all(after["data_skipped"][k] >= n for k, n in before["data_skipped"].items())
    tags = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    assert len([t for t in tags if t.startswith("data/skipped_")]) == len(SKIP_REASONS)
    assert "skipped data " in console
    # One epoch record per epoch (the last one cut by max_steps), its train counts at least the epoch's
    # last interval's, and a warning per reason that occurred with the run's running total.
    epochs = [r for r in records if "data_skipped_epoch" in r]
    assert [r["epoch"] for r in epochs] == sorted({r["epoch"] for r in logged})
    run_total = 0
    for record in epochs:
        last = [r for r in logged if r["epoch"] == record["epoch"]][-1]
        assert all(record["data_skipped_epoch"][k] >= n for k, n in last["data_skipped"].items())
        assert list(record["cv_data_skipped"]) == list(SKIP_REASONS)
        n = record["data_skipped_epoch"][SHORT]
        run_total += n
        assert f"epoch {record['epoch']} data skipped: train " in console
        if n:
            assert f"epoch {record['epoch']}: {n} samples skipped: {SHORT} ({run_total} in this run)" in console
    assert run_total > 0


def _counts(given: dict[str, int]) -> dict[str, int]:
    """Every reason, as the loop reports them."""
    return {r: given.get(r, 0) for r in SKIP_REASONS}


def test_epoch_report_counts_the_run_across_a_resume(tmp_path, caplog):
    """Warnings carry the run's total per reason; a resumed logger takes the earlier epochs from
    metrics.jsonl, and an epoch reported again (cut by max_steps, then finished) counts once."""
    def warnings(logger: TrainLogger, *report) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="moe_asr.train"):
            logger.epoch_data(*report)
        return [r.getMessage() for r in caplog.records]

    first = TrainLogger(tmp_path, True, [], 0)
    lines = warnings(first, 10, 0, _counts({"empty audio": 2, SHORT: 3}), _counts({"empty audio": 1}))
    assert lines == [f"epoch 0 data skipped: train 5 ({SHORT} 3, empty audio 2), CV 1 (empty audio 1)",
                     "epoch 0: 2 samples skipped: empty audio (2 in this run)",
                     f"epoch 0: 3 samples skipped: {SHORT} (3 in this run)",
                     "epoch 0: 1 CV samples skipped: empty audio (1 in this run)"]
    warnings(first, 15, 1, _counts({SHORT: 1}), _counts({}))  # max_steps stopped epoch 1 here
    first.close()
    resumed = TrainLogger(tmp_path, True, [], 0, resume_step=15)
    assert warnings(resumed, 20, 1, _counts({SHORT: 4}), _counts({}))[1:] == \
        [f"epoch 1: 4 samples skipped: {SHORT} (7 in this run)"]
    with caplog.at_level(logging.INFO, logger="moe_asr.train"):
        resumed.train(21, 2, {"loss": 1.0}, 1e-3, 100.0, 1.0, 0,
                      WindowLoad(torch.zeros(0, 1), torch.zeros(0), torch.zeros(0), None), _counts({"empty audio": 1}))
        line = caplog.records[-1].getMessage()
    resumed.close()
    assert line.endswith("skipped 0 skipped data 1 (empty audio 1)")
    epochs = [r for r in read_metrics(tmp_path) if "data_skipped_epoch" in r]
    assert [(r["step"], r["epoch"]) for r in epochs] == [(10, 0), (15, 1), (20, 1)]
