"""Loss-free balancing on two expert-parallel ranks: the expert bias moves by the counts of both ranks,
stays equal on both, travels in checkpoints and resumes exactly.

Each rank routes its own batches, so the two ranks' counts differ at every step; the bias must still
be one value on both ranks: the sum over the steps of ``choice_bias_step`` of the two ranks' counts
together. 6 steps straight vs 3, stop, resume, 3 more (as tests/engine/test_resume.py) must give the
same losses and the same weights and biases. The consolidated file (``ds-to-pt --with-optimizer``, what
``--init-from`` continues at another layout) holds the same bias.
"""
from __future__ import annotations

import pytest
import torch

from moe_asr.checkpoint.convert import ds_to_pt
from moe_asr.moe.router import choice_bias_step
from moe_asr.run.layout import read_deepspeed_model
from tests.engine.conftest import REPO, SMALL_MODEL, data_overrides, read_metrics, run_training, train_cmd

STEPS = 6
RATE = 0.05
SCRIPT = str(REPO / "tests/engine/expert_bias_training.py")


def _train(corpus, out_dir, max_steps: int, port: int) -> None:
    overrides = {**SMALL_MODEL, **data_overrides(corpus), "parallel.ep_size": 2, "train.max_steps": max_steps,
                 "train.log_interval": 1, "train.warmup_steps": 3, "train.checkpoint_interval": 3,
                 "model.moe.bias_update_rate": RATE}
    run_training(train_cmd(corpus, out_dir, "ds_configs/zero1_cpu.json", overrides, port, script=SCRIPT))


def _dumps(out_dir) -> list[dict]:
    return [torch.load(out_dir / f"choice_bias_rank_{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_bias_is_balanced_from_all_ranks_equal_on_both_and_resumes_exactly(small_corpus, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(small_corpus, straight, STEPS, 29661)
    ranks = _dumps(straight)
    local = [d["local_tokens"] for d in ranks]  # [steps, layers, experts] each
    assert local[0].shape[0] == STEPS and not torch.equal(local[0], local[1]), "the ranks' loads must differ"
    expected = sum(choice_bias_step(local[0][s] + local[1][s], RATE) for s in range(STEPS))
    names = list(ranks[0]["bias"])
    for rank in ranks:
        assert list(rank["bias"]) == names
        torch.testing.assert_close(torch.stack(list(rank["bias"].values())), expected, rtol=0, atol=1e-6)
    assert torch.equal(torch.stack(list(ranks[0]["bias"].values())), torch.stack(list(ranks[1]["bias"].values())))
    assert expected.abs().max() >= 2 * RATE  # moved, and not back and forth only
    saved = read_deepspeed_model(straight / "checkpoints" / f"step_{STEPS}")
    consolidated, _ = ds_to_pt(straight, f"step_{STEPS}", with_optimizer=True)  # the file --init-from reshards
    for name, bias in ranks[0]["bias"].items():
        assert torch.equal(saved[f"{name}.router.choice_bias"], bias), name
        assert torch.equal(consolidated.state[f"{name}.router.choice_bias"], bias), name
    assert all("moe_max_mean" in r and "moe_rank_share" in r for r in read_metrics(straight) if "loss" in r)

    _train(small_corpus, split, STEPS // 2, 29662)
    _train(small_corpus, split, STEPS, 29663)
    losses = [[(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r] for run in (straight, split)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == list(range(1, STEPS + 1))
    for a, b in zip(*losses):
        assert a == pytest.approx(b, rel=1e-6), a[0]
    resumed = read_deepspeed_model(split / "checkpoints" / f"step_{STEPS}")
    assert saved.keys() == resumed.keys()
    for key in saved:
        torch.testing.assert_close(resumed[key], saved[key], rtol=0, atol=1e-7, msg=key)
