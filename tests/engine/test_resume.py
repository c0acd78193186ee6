"""Resume is exact, and a rank killed mid-save leaves ``latest`` on the last complete checkpoint.

Exactness: 6 steps straight vs 3 steps, stop, resume from ``latest``, 3 more,
with everything random switched on (dropout, dynamic chunks, SpecAugment,
shuffling) and the stop in the middle of an epoch. Same per-step losses and
same final parameters means the model, optimizer, LR schedule, RNG states and
data loader position were all restored.
"""
from __future__ import annotations

import json

import pytest
import torch

from moe_asr.run.layout import read_deepspeed_model
from tests.engine.conftest import (REPO, SMALL_MODEL, data_overrides, read_metrics,
                                   run_training, train_cmd)

STEPS = 6


def _overrides(corpus, max_steps: int) -> dict:
    return {**SMALL_MODEL, **data_overrides(corpus), "parallel.ep_size": 2, "train.max_steps": max_steps,
            "train.log_interval": 1, "train.warmup_steps": 3, "train.decay": "noam", "train.checkpoint_interval": 2}


def _train_losses(out_dir) -> list[tuple[int, float, float, float, float]]:
    return [(r["step"], r["loss"], r["loss_ctc"], r["loss_l2r"], r["loss_r2l"])
            for r in read_metrics(out_dir) if "loss" in r]


@pytest.mark.slow
def test_resume_continues_the_same_run(small_corpus, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_training(train_cmd(small_corpus, straight, "ds_configs/zero1_cpu.json", _overrides(small_corpus, STEPS),
                           29631))
    run_training(train_cmd(small_corpus, split, "ds_configs/zero1_cpu.json", _overrides(small_corpus, STEPS // 2),
                           29632))
    first = _train_losses(split)
    stopped = torch.load(split / "checkpoints" / f"step_{STEPS // 2}" / "trainer_state_rank_0.pt",
                         weights_only=False)
    assert stopped["loader"]["batches_delivered"] > 0 and not stopped["loader"]["complete"], \
        "the stop must fall inside an epoch"
    run_training(train_cmd(small_corpus, split, "ds_configs/zero1_cpu.json", _overrides(small_corpus, STEPS),
                           29633))

    assert [s for s, *_ in first] == list(range(1, STEPS // 2 + 1))
    a, b = _train_losses(straight), _train_losses(split)
    assert [s for s, *_ in a] == [s for s, *_ in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-6), ra[0]
    pa = read_deepspeed_model(straight / "checkpoints" / f"step_{STEPS}")
    pb = read_deepspeed_model(split / "checkpoints" / f"step_{STEPS}")
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=0, atol=1e-7, msg=key)


@pytest.mark.slow
def test_killed_rank_fails_the_job_and_keeps_latest_complete(small_corpus, tmp_path):
    """Rank 1 is SIGKILLed while writing the second checkpoint, under the deepspeed launcher."""
    out = tmp_path / "run"
    cmd = train_cmd(small_corpus, out, "ds_configs/zero2_cpu.json", _overrides(small_corpus, STEPS), 29641,
                    launcher="deepspeed", script=str(REPO / "tests/engine/kill_during_save.py"))
    result = run_training(cmd, check=False)
    assert result.returncode != 0, result.stdout[-3000:]
    ckpts = out / "checkpoints"
    latest = (ckpts / "latest").read_text()
    assert [c["tag"] for c in json.loads((ckpts / "checkpoints.json").read_text())] == [latest]
    partial = [d.name for d in ckpts.iterdir() if d.is_dir() and not (d / "trainer_state_rank_1.pt").exists()]
    assert len(partial) == 1 and partial[0] != latest
    complete = {p.name for p in (ckpts / latest).iterdir()}
    assert {"mp_rank_00_model_states.pt", "trainer_state_rank_0.pt", "trainer_state_rank_1.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= complete
    # The job restarts from latest (step 2) and finishes.
    run_training(train_cmd(small_corpus, out, "ds_configs/zero2_cpu.json", _overrides(small_corpus, STEPS), 29642))
    assert (ckpts / "latest").read_text() == f"step_{STEPS}"
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, STEPS + 1))
