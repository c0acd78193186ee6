"""Expert parallelism is exact through the whole DeepSpeed engine, for ZeRO stages 0, 1 and 2.

Two 2-rank runs on the same data: ``ep_size=1`` (every rank holds all experts,
expert gradients averaged over both ranks) and ``ep_size=2`` (each rank holds
half the experts, tokens exchanged by all-to-all). With dropout off, both see
the same global batches and the same dynamic-chunk draws, so their losses and
their updated parameters (gathered from the per-expert checkpoint files) must
agree to fp32 rounding. Adam hides gradient scale (its update is about
``sign(g)``), so the runs use an eps far above the clipped gradients: the
update becomes linear in the gradient, and a wrongly reduced expert gradient
or a clip by anything but the global norm changes the parameters.
Each run also leaves a DeepSpeed checkpoint with one file per global expert.
"""
from __future__ import annotations

import pytest
import torch

from moe_asr.run.layout import read_deepspeed_model
from tests.engine.conftest import SMALL_MODEL, data_overrides, read_metrics, run_training, train_cmd

NO_DROPOUT = {f"model.{part}.{key}": 0.0 for part in ("encoder", "decoder")
              for key in ("dropout_rate", "positional_dropout_rate")}
STEPS = 2


def _run(corpus, out_dir, stage: int, ep_size: int, port: int) -> None:
    overrides = {**SMALL_MODEL, **NO_DROPOUT, **data_overrides(corpus), "parallel.ep_size": ep_size,
                 "train.max_steps": STEPS, "train.max_epochs": 1, "train.log_interval": 1,
                 "train.warmup_steps": 0, "train.decay": "constant", "train.grad_clip": 0.01, "train.lr": 0.002,
                 "train.eps": 1e-3}
    run_training(train_cmd(corpus, out_dir, f"ds_configs/zero{stage}_cpu.json", overrides, port))


def _check_layout(ckpt, num_layers: int, num_experts: int) -> None:
    names = {p.name for p in ckpt.iterdir()}
    for layer in range(num_layers):
        for e in range(num_experts):
            assert f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" in names
    assert f"layer_{num_layers}_expert_0_mp_rank_00_model_states.pt" not in names
    assert {"mp_rank_00_model_states.pt", "trainer_state_rank_0.pt", "trainer_state_rank_1.pt"} <= names
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert not [k for k in module if "expert" in k], "expert weights must live in the per-expert files only"


@pytest.mark.slow
@pytest.mark.parametrize("stage,port", [(0, 29611), (1, 29613), (2, 29615)])
def test_ep2_equals_ep1(small_corpus, tmp_path, stage, port):
    _run(small_corpus, tmp_path / "ep1", stage, 1, port)
    _run(small_corpus, tmp_path / "ep2", stage, 2, port + 1)

    m1, m2 = read_metrics(tmp_path / "ep1"), read_metrics(tmp_path / "ep2")
    train1, train2 = [r for r in m1 if "loss" in r], [r for r in m2 if "loss" in r]
    assert [r["step"] for r in train1] == [r["step"] for r in train2] == list(range(1, STEPS + 1))
    for a, b in zip(train1, train2):
        for key in ("loss", "loss_ctc", "loss_l2r", "loss_r2l"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)

    tag = (tmp_path / "ep1" / "checkpoints" / "latest").read_text()
    assert tag == (tmp_path / "ep2" / "checkpoints" / "latest").read_text() == f"step_{STEPS}"
    ckpt1, ckpt2 = (tmp_path / run / "checkpoints" / tag for run in ("ep1", "ep2"))
    moe_layers = 2 * SMALL_MODEL["model.encoder.num_blocks"] + 2  # macaron pair per block, L2R + R2L decoder
    for ckpt in (ckpt1, ckpt2):
        _check_layout(ckpt, moe_layers, SMALL_MODEL["model.moe.num_experts"])
    p1, p2 = read_deepspeed_model(ckpt1), read_deepspeed_model(ckpt2)
    assert p1.keys() == p2.keys()
    for key in p1:
        torch.testing.assert_close(p1[key], p2[key], rtol=1e-5, atol=2e-6, msg=key)
