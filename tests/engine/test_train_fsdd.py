"""A small MoE model learns real speech: a few hundred 2-rank expert-parallel steps on FSDD.

Four speakers train (george and yweweler are held out entirely); the CV set
is other recordings of the training speakers. The model is the test model
(every FFN a 4-expert MoE, ep_size 2): the tiny config trains the same way in
docs/training.md but takes longer than a test should.
"""
from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_asr.data.stats import SKIP_REASONS
from tests.engine.conftest import SMALL_MODEL, build_corpus, data_overrides, read_metrics, run_training, train_cmd


@pytest.mark.slow
def test_cv_loss_falls_on_real_audio(tmp_path_factory):
    corpus = build_corpus(tmp_path_factory.mktemp("fsdd"), range(0, 30), range(45, 47), 50)
    out = tmp_path_factory.mktemp("train")
    overrides = {**SMALL_MODEL, **data_overrides(corpus, max_frames=1500), "model.moe.ep_size": 2,
                 "train.max_steps": 240, "train.lr": 0.004, "train.warmup_steps": 40, "train.log_interval": 20}
    run_training(train_cmd(corpus, out, "ds_configs/zero1_cpu.json", overrides, 29651), timeout=600)
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
