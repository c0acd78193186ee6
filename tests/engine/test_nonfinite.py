"""Non-finite losses and gradients skip steps on every rank, are counted, and too many in a row stop training."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moe_asr.run.layout import INDEX, read_deepspeed_model
from tests.engine.conftest import (REPO, SMALL_MODEL, data_overrides, read_metrics,
                                   run_training, train_cmd)

SCRIPT = str(REPO / "tests/engine/poisoned_training.py")


def _overrides(corpus, steps: int) -> dict:
    return {**SMALL_MODEL, **data_overrides(corpus), "parallel.ep_size": 2, "train.max_steps": steps,
            "train.log_interval": 1, "train.warmup_steps": 2}


@pytest.mark.slow
@pytest.mark.parametrize("stage,port", [(0, 29661), (2, 29662)])
def test_nonfinite_steps_are_skipped_and_counted(small_corpus, tmp_path, monkeypatch, stage, port):
    # Rank 1 only: losses of micro-batches 2 and 3 are NaN, the gradient of micro-batch 5 is NaN.
    monkeypatch.setenv("POISON_LOSS", "2,3")
    monkeypatch.setenv("POISON_GRAD", "5")
    overrides = {**_overrides(small_corpus, 5), "train.checkpoint_interval": 1, "train.keep_checkpoints": 10}
    run_training(train_cmd(small_corpus, tmp_path, f"ds_configs/zero{stage}_cpu.json", overrides, port,
                           script=SCRIPT))
    train = [r for r in read_metrics(tmp_path) if "loss" in r]
    # 7 micro-batches: 2 dropped before backward, 5 optimizer steps of which one (micro-batch 5, step 3) skipped.
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert [r["skipped"] for r in train] == [0, 2, 3, 3, 3]
    assert all(math.isfinite(r["loss"]) for r in train)
    index = json.loads((tmp_path / "checkpoints" / INDEX).read_text())
    tags = {c["step"]: c["tag"] for c in index}  # step_N, or epoch_E where an epoch ended
    params = {step: read_deepspeed_model(tmp_path / "checkpoints" / tags[step]) for step in range(1, 6)}
    assert all(torch.isfinite(v).all() for v in params[5].values() if v.is_floating_point())
    changed = [[k for k, v in params[step].items() if not torch.equal(v, params[step - 1][k])] for step in (2, 3, 4)]
    assert changed[0] and changed[2], "steps 2 and 4 update the weights"
    assert changed[1] == [], f"the skipped step 3 changed {changed[1]}"


@pytest.mark.slow
def test_too_many_nonfinite_in_a_row_stop_with_an_error(small_corpus, tmp_path, monkeypatch):
    """One plain process (no launcher): every loss is NaN; the third in a row ends the run."""
    monkeypatch.setenv("POISON_LOSS", "all")
    monkeypatch.setenv("POISON_RANK", "0")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cmd = train_cmd(small_corpus, tmp_path, "ds_configs/zero0_cpu.json",
                    {**_overrides(small_corpus, 5), "parallel.ep_size": 1, "train.max_consecutive_nonfinite": 3},
                    0, launcher="python", script=SCRIPT)
    result = run_training(cmd, check=False)
    assert result.returncode != 0
    assert "NonFiniteError: 3 consecutive steps had a non-finite loss or gradient" in result.stderr
    assert not (tmp_path / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_vocab_size_must_match_the_symbol_table(small_corpus, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    overrides = _overrides(small_corpus, 5)
    vocab = overrides["model.vocab_size"] + 1
    cmd = train_cmd(small_corpus, tmp_path, "ds_configs/zero0_cpu.json",
                    {**overrides, "parallel.ep_size": 1, "model.vocab_size": vocab}, 0, launcher="python")
    result = run_training(cmd, check=False)
    assert result.returncode != 0
    assert f"model.vocab_size is {vocab}, but the symbol table" in result.stderr
