"""Single-process checks of the engine's parts: schedule, configs, DeepSpeed's view of the MoE layers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moe_asr.run.config import ConfigError, TrainConfig
from moe_asr.engine.deepspeed_engine import deepspeed_config
from moe_asr.engine.deepspeed_moe import prepare_moe_layers
from moe_asr.run.layout import gather_experts
from moe_asr.engine.optim import WarmupDecay, param_groups
from moe_asr.train import load_experiment
from moe_asr.model.u2pp import build_model
from tests.engine.conftest import REPO
from tests.helpers import tiny_config

TINY = str(REPO / "conf" / "tiny_moe.yaml")


def test_warmup_then_decay():
    noam = WarmupDecay(warmup=4, decay="noam", total=0, floor=0.0)
    assert [noam(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert noam(15) == pytest.approx(math.sqrt(4 / 16))
    cosine = WarmupDecay(warmup=2, decay="cosine", total=12, floor=0.1)
    assert cosine(1) == 1.0 and cosine(6) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine(11) == pytest.approx(0.1) and cosine(100) == pytest.approx(0.1)
    linear = WarmupDecay(warmup=0, decay="linear", total=10, floor=0.0)
    assert linear(4) == pytest.approx(0.5) and linear(20) == 0.0


def test_train_config_checks():
    with pytest.raises(ConfigError, match="decay_steps"):
        TrainConfig(decay="cosine")
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(warmup_steps=0)


def _ds(tmp_path, cfg: dict):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return deepspeed_config(path, TrainConfig(grad_clip=2.0, accum_grad=3))


def test_deepspeed_config_is_completed_from_the_train_section(tmp_path):
    cfg = _ds(tmp_path, {"zero_optimization": {"stage": 2}})
    assert cfg["gradient_accumulation_steps"] == 3 and cfg["gradient_clipping"] == 2.0
    assert _ds(tmp_path, {"zero_optimization": {"stage": 0}})["gradient_clipping"] == 0.0  # Stage0AdamW clips
    with pytest.raises(ConfigError, match="optimizer"):
        _ds(tmp_path, {"optimizer": {"type": "Adam"}})
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        _ds(tmp_path, {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="stage 1 or 2"):
        _ds(tmp_path, {"bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match="contiguous_gradients: false at ZeRO stage 1 all-reduces expert"):
        _ds(tmp_path, {"zero_optimization": {"stage": 1, "contiguous_gradients": False}})
    assert _ds(tmp_path, {"zero_optimization": {"stage": 2, "contiguous_gradients": True}})  # the default, fine
    with pytest.raises(ConfigError, match="use_data_before_expert_parallelism would be ignored"):
        _ds(tmp_path, {"zero_optimization": {"stage": 1}, "use_data_before_expert_parallelism": True})


def test_shipped_deepspeed_configs_are_accepted():
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        deepspeed_config(path, TrainConfig())


def test_overrides_are_validated():
    cfg = load_experiment(TINY, ["parallel.ep_size=2", "train.lr=0.002"], train_shards="a.list")
    assert cfg.parallel.ep_size == 2 and cfg.train.lr == 0.002 and cfg.data.train_shards == "a.list"
    with pytest.raises(ConfigError, match="ep_size"):
        load_experiment(TINY, ["parallel.ep_size=3"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_experiment(TINY, ["train.learning_rate=1"])


def test_moe_layers_show_deepspeed_keys_and_load_back(one_rank):
    """DeepSpeed's per-expert key layout out, our stacked layout in: a state dict round trip is exact."""
    from deepspeed.moe.layer import MoE

    torch.manual_seed(0)
    model = build_model(tiny_config(num_experts=4))
    stacked = {k: v.clone() for k, v in model.state_dict().items()}
    plain = [p for p in model.parameters() if hasattr(p, "allreduce") or hasattr(p, "group_name")]
    assert not plain, "a model built for decoding carries no DeepSpeed markers"
    layers = list(prepare_moe_layers(model, 1).values())
    assert layers and all(isinstance(m, MoE) for m in layers)
    assert layers[0].num_local_experts == 4 and layers[0].expert_group_name == "ep_size_1"
    assert layers[0].experts.w1.allreduce is False and layers[0].experts.w1.group_name == "ep_size_1"
    state = model.state_dict()
    name = next(k for k in stacked if k.endswith("experts.w1"))
    prefix = name[:-len("experts.w1")]
    assert name not in state
    for e in range(4):
        torch.testing.assert_close(state[f"{prefix}deepspeed_moe.experts.deepspeed_experts.{e}.w1"], stacked[name][e])
    fresh = build_model(tiny_config(num_experts=4))
    prepare_moe_layers(fresh, 1)
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, state[k])
    # The reader's mapping (no DeepSpeed needed) gives back the stacked layout exactly.
    back = gather_experts(state, "test")
    assert back.keys() == stacked.keys()
    for k, v in stacked.items():
        torch.testing.assert_close(back[k], v)


def test_gather_experts_names_a_missing_expert():
    state = {f"enc.ff.deepspeed_moe.experts.deepspeed_experts.{e}.w1": torch.zeros(2, 3) for e in (0, 1, 3)}
    with pytest.raises(FileNotFoundError, match=r"ckpt/x: layer enc.ff has no w1 for expert\(s\) \[2\]"):
        gather_experts(state, "ckpt/x")


def test_weight_decay_spares_biases_and_norms(one_rank):
    model = build_model(tiny_config(num_experts=4))
    prepare_moe_layers(model, 1)
    groups = param_groups(model, 0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    experts = model.moe_layers()[0].experts
    assert by_id[id(experts.w1)]["weight_decay"] == 0.1 and by_id[id(experts.b1)]["weight_decay"] == 0.0
    assert by_id[id(experts.w1)].get("moe") and not by_id[id(model.ctc.ctc_lo.weight)].get("moe")
    assert by_id[id(model.ctc.ctc_lo.bias)]["weight_decay"] == 0.0


def test_srun_tasks_without_ranks_are_refused(monkeypatch):
    """`srun -n 2 python launch/train.py` gives two tasks and no RANK: each would be a world of its own,
    both writing one out-dir. Refused before anything starts (a single task, or RANK set, is fine)."""
    from moe_asr.engine.distributed import init_distributed

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    with pytest.raises(ConfigError, match="srun started 2 tasks of the training script with no RANK set"):
        init_distributed()
