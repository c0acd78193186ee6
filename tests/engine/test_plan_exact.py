"""``moe-asr plan``'s model-state bytes equal what real DeepSpeed runs hold, rank by rank.

Each layout (fp32 and bf16, DeepSpeed's bf16 ZeRO runs on its CPU accelerator) trains one step on CPU ranks through ``tests/engine/plan_training.py``, which dumps per
rank the bytes of ZeRO's flat parameter buffers, the gradients kept for its partition, the reduction
buckets, the fp32 master partitions and Adam's moments, expert and non-expert groups apart. The plan
must give exactly those numbers (padding included: it is memory the GPU holds). The checkpoint files
of the same step are compared too: DeepSpeed writes the fp32 master partitions without their padding
and the moments with it, which ``Group.padding`` accounts for.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_asr.plan import Layout, bucket_bytes, model_states, optimizer_groups, parameters
from moe_asr.run.config import ExperimentConfig
from moe_asr.run.files import load_file
from moe_asr.train import load_experiment
from tests.engine.conftest import REPO, SMALL_MODEL, build_corpus, data_overrides, run_training, train_cmd

SCRIPT = str(REPO / "tests/engine/plan_training.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The small corpus in shards of 5, enough for 4 ranks' CV (8 shards)."""
    return build_corpus(tmp_path_factory.mktemp("fsdd_plan"), range(0, 4), range(45, 46), 5)


@pytest.mark.slow
@pytest.mark.parametrize("world,ep_size,ds_config", [
    (2, 1, "zero1_cpu"), (2, 1, "zero2_cpu"), (2, 2, "zero1_cpu"), (2, 2, "zero2_cpu"), (4, 2, "zero2_cpu"),
    (2, 2, "zero1_bf16"), (2, 2, "zero2_bf16")])
def test_plan_states_equal_what_each_rank_holds(corpus, tmp_path, world, ep_size, ds_config):
    overrides = {**SMALL_MODEL, **data_overrides(corpus), "parallel.ep_size": ep_size,
                 "train.max_steps": 1, "train.warmup_steps": 3}
    ds_path = REPO / "ds_configs" / f"{ds_config}.json"
    port = 29740 + 10 * world + 3 * ep_size + int(ds_config[4]) + (5 if "bf16" in ds_config else 0)
    run_training(train_cmd(corpus, tmp_path, str(ds_path), overrides, port, nproc=world, script=SCRIPT), timeout=600)
    config = load_experiment(str(REPO / "conf/tiny_moe.yaml"), [f"{k}={v}" for k, v in overrides.items()])
    layout = Layout.from_deepspeed(json.loads(ds_path.read_text()), gpus_per_node=world, ep_size=ep_size)
    assert_ranks_hold_plan(tmp_path, "step_1", config, layout)
    params = parameters(config.model)
    assert any(g.padding for r in range(world) for g in optimizer_groups(params, layout, r)), "padding untested"


def assert_ranks_hold_plan(out_dir: Path, tag: str, config: ExperimentConfig, layout: Layout) -> None:
    """Every rank of a run of ``config`` in ``layout`` held the plan's bytes: its ZeRO buffers as
    ``plan_training.py`` dumped them (``plan_rank_<r>.json``) and its optimizer partitions in checkpoint ``tag``."""
    params = parameters(config.model)
    for rank in range(layout.world):
        measured = json.loads((out_dir / f"plan_rank_{rank}.json").read_text())
        planned = model_states(params, layout, rank)
        assert {part: measured[part] for part in planned} == planned, rank
        assert measured["buckets"] == bucket_bytes(layout)
        groups = optimizer_groups(params, layout, rank)
        assert measured["group_ranks"] == [g.ranks for g in groups] and measured["moe"] == [g.expert for g in groups]
        prefix = "bf16_" if layout.dtype == "bf16" else ""  # DeepSpeed's name for a bf16 run's optimizer files
        saved = load_file(out_dir / "checkpoints" / tag / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        state = saved["optimizer_state_dict"]
        masters = [t.numel() for t in state["single_partition_of_fp32_groups"]]
        assert masters == [g.partition - g.padding for g in groups], rank
        moments = state["base_optimizer_state"]["state"]
        assert [moments[i]["exp_avg"].numel() + moments[i]["exp_avg_sq"].numel() for i in range(len(groups))] \
            == [2 * g.partition for g in groups], rank
