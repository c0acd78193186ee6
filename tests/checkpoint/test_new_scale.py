"""A run continues at another layout from its layout-free training state (ds-to-pt --with-optimizer, --init-from).

The reference: 6 steps straight on 2 ranks with ep_size 2 (ZeRO 2). The other
run stops after 3 steps (inside the epoch), is converted to one file with its
training state, and continues:

(a) on 2 ranks with ep_size 1: every expert now lives on both ranks and ZeRO 2
    partitions the expert groups over two ranks instead of one. Same data order
    and RNG (same world size), so steps 4-6 must give the straight run's losses
    (to 1e-5) and parameters (to 1e-5: an ep_size 1 run started from scratch
    differs from the ep_size 2 one by up to 6e-6 after 6 steps, float reduction
    order compounded by Adam), and exactly the parameters of an uninterrupted
    ep_size 1 run, which isolates what the conversion itself may change.
    Dropout is off: an expert's hidden-dropout mask is drawn by the rank that
    runs the expert, which ep_size changes (everything else it draws does not).
    The optimisation is the ep_size 2 == 1 proof's (large AdamW eps, small clip):
    Adam turns a gradient that is zero but for rounding (a key bias) into a
    full-size step, and a large step can flip a near-tie of the top-2 routing,
    either of which would blow float reduction order up into visible
    parameter differences (a fresh ep_size 1 run then differs from the ep_size
    2 one just as much);
(b) on 1 rank (ZeRO 0): the engine must hold exactly the file's moments, Adam
    step, LR schedule position and step counter, and train on from step 4.

And the reader of DeepSpeed's optimizer files agrees with itself across
layouts: ZeRO 0 and ZeRO 2 runs of the same 3 steps give the same training state.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moe_asr.checkpoint import read_model_state
from moe_asr.run.layout import read_deepspeed_model
from tests.engine.conftest import REPO, SMALL_MODEL, data_overrides, read_metrics, run_training, train_cmd
from tests.engine.test_expert_parallel_training import NO_DROPOUT

STEPS = 6
HERE = REPO / "tests" / "checkpoint"


def _overrides(corpus, max_steps: int, ep_size: int) -> dict:
    return {**SMALL_MODEL, **NO_DROPOUT, **data_overrides(corpus), "parallel.ep_size": ep_size, "train.max_steps": max_steps,
            "train.log_interval": 1, "train.warmup_steps": 3, "train.decay": "noam", "train.eps": 1e-3,
            "train.grad_clip": 0.01}


def _losses(out_dir) -> dict[int, tuple[float, ...]]:
    return {r["step"]: (r["loss"], r["loss_ctc"], r["loss_l2r"], r["loss_r2l"], r["lr"])
            for r in read_metrics(out_dir) if "loss" in r}


def _convert(run_dir, out) -> None:
    result = subprocess.run([sys.executable, "-m", "moe_asr.cli", "convert", "ds-to-pt", str(run_dir),
                             "--with-optimizer", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("new_scale")
    z2 = str(REPO / "ds_configs/zero2_cpu.json")
    run_training(train_cmd(small_corpus, root / "straight", z2, _overrides(small_corpus, STEPS, 2), 29671))
    run_training(train_cmd(small_corpus, root / "first", z2, _overrides(small_corpus, STEPS // 2, 2), 29672))
    _convert(root / "first", root / "first.pt")
    return root


@pytest.mark.slow
def test_continue_on_two_ranks_at_ep_size_1(runs, small_corpus):
    cmd = train_cmd(small_corpus, runs / "ep1", str(REPO / "ds_configs/zero2_cpu.json"),
                    _overrides(small_corpus, STEPS, 1), 29673) + ["--init-from", str(runs / "first.pt")]
    out = run_training(cmd)
    assert "continuing" in out.stdout
    straight, resumed = _losses(runs / "straight"), _losses(runs / "ep1")
    assert sorted(resumed) == list(range(STEPS // 2 + 1, STEPS + 1))
    for step, values in resumed.items():
        assert values == pytest.approx(straight[step], rel=1e-5), step
    run_training(train_cmd(small_corpus, runs / "ep1_straight", str(REPO / "ds_configs/zero2_cpu.json"),
                           _overrides(small_corpus, STEPS, 1), 29675))
    a, b, c = (read_deepspeed_model(runs / run / "checkpoints" / f"step_{STEPS}")
               for run in ("straight", "ep1", "ep1_straight"))
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(b[key], c[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.slow
def test_continue_on_one_rank_holds_the_files_state(runs, small_corpus):
    out_dir = runs / "one_rank"
    cmd = train_cmd(small_corpus, out_dir, str(REPO / "ds_configs/zero0_cpu.json"),
                    _overrides(small_corpus, STEPS // 2 + 1, 1), 0, launcher="python",
                    script=str(HERE / "init_and_dump.py")) + ["--init-from", str(runs / "first.pt")]
    run_training(cmd)
    ts = read_model_state(runs / "first.pt").extra["training_state"]
    applied = torch.load(out_dir / "applied.pt", weights_only=False)
    assert applied["global_steps"] == ts["step"] == STEPS // 2
    assert applied["adam_steps"] == [ts["adam_step"]] == [float(STEPS // 2)]
    assert applied["lr"][0] == pytest.approx(_losses(runs / "straight")[STEPS // 2][-1])
    assert applied["moments"].keys() == ts["moments"].keys()
    for name, moments in ts["moments"].items():
        for key, value in moments.items():
            assert torch.equal(applied["moments"][name][key], value), (name, key)
    assert sorted(_losses(out_dir)) == [STEPS // 2 + 1]
    assert _losses(out_dir)[STEPS // 2 + 1][-1] == pytest.approx(_losses(runs / "straight")[STEPS // 2 + 1][-1])


@pytest.mark.slow
def test_zero0_and_zero2_files_give_the_same_training_state(runs, small_corpus):
    run_training(train_cmd(small_corpus, runs / "first_z0", str(REPO / "ds_configs/zero0_cpu.json"),
                           _overrides(small_corpus, STEPS // 2, 2), 29674))
    _convert(runs / "first_z0", runs / "first_z0.pt")
    z0, z2 = (read_model_state(runs / name) for name in ("first_z0.pt", "first.pt"))
    t0, t2 = z0.extra["training_state"], z2.extra["training_state"]
    assert (t0["step"], t0["adam_step"], t0["lr_step"]) == (t2["step"], t2["adam_step"], t2["lr_step"])
    assert t0["layout"] == {"world_size": 2, "ep_size": 2, "zero_stage": 0}
    assert t2["layout"] == {"world_size": 2, "ep_size": 2, "zero_stage": 2}
    experts = next(k for k in t2["moments"] if k.endswith("experts.w1"))
    assert t2["moments"][experts]["exp_avg"].shape[0] == SMALL_MODEL["model.moe.num_experts"]
    assert t0["moments"].keys() == t2["moments"].keys() == dict(z2.state).keys() - {
        k for k in z2.state if k.endswith(("mean", "istd", "running_mean", "running_var", "num_batches_tracked",
                                          "choice_bias"))}  # buffers: no moments
    for name in t2["moments"]:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(t0["moments"][name][key], t2["moments"][name][key], rtol=1e-4, atol=1e-9,
                                       msg=f"{name} {key}")
    for name in t2["moments"]:
        torch.testing.assert_close(z0.state[name], z2.state[name], rtol=1e-5, atol=2e-6, msg=name)
