"""examples/common/resources.py: the per-GPU memory and compute the recipe READMEs state."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from moe_asr.model.parameters import count_parameters
from moe_asr.plan import Layout, model_states, parameters
from moe_asr.run.config import load_config

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "common" / "resources.py"
TINY = {"model": {"vocab_size": 40, "input_dim": 80,
                  "encoder": {"output_size": 32, "attention_heads": 2, "linear_units": 48, "num_blocks": 2,
                              "cnn_module_kernel": 5},
                  "decoder": {"attention_heads": 2, "linear_units": 48, "num_blocks": 1, "r_num_blocks": 1},
                  "moe": {"num_experts": 4, "top_k": 2}},
        "data": {"batching": {"max_frames_in_batch": 2000}, "filters": {"max_frames": 2000}}}


def _module():
    spec = importlib.util.spec_from_file_location("recipe_resources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(tmp_path: Path, vocab_size: int = 40):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "model": {**TINY["model"], "vocab_size": vocab_size}}))
    return load_config(path)


def test_model_states_are_the_planners_most_loaded_gpu_and_split_experts_by_ep_size(tmp_path):
    config = _config(tmp_path)
    resources = _module()
    states = resources.model_states(config, gpus=4, ep_size=2)
    layout = Layout(gpus_per_node=4, ep_size=2, zero_stage=2, dtype="bf16")
    ranks = [model_states(parameters(config.model), layout, r) for r in range(4)]
    assert sum(states.values()) == max(sum(sum(part.values()) for part in r.values()) for r in ranks)
    params = count_parameters(config.model)
    experts = params["breakdown"]["encoder.experts"] + params["breakdown"]["decoder.experts"]
    dense = params["total_params"] - experts
    # bf16 weights: every dense parameter and half the experts, plus DeepSpeed's padding (under 2 x 4 a group)
    assert 0 <= states["weights_bf16"] - 2 * (dense + experts / 2) < 2 * 4 * 2 * 4
    # fp32 master + two moments: a quarter of the dense part and half of this GPU's experts, padded
    assert 0 <= states["master_and_adam_fp32"] - 12 * (dense / 4 + experts / 2 / 2) < 12 * 4 * 2
    assert sum(resources.model_states(config, gpus=4, ep_size=1).values()) > sum(states.values())


def test_measured_activations_grow_with_the_audio_and_leave_the_weights_out(tmp_path):
    resources = _module()
    config = _config(tmp_path)
    (short, short_flops), (long, long_flops) = (resources.measure(config, s, 4.0) for s in (2.0, 4.0))
    assert 1.8 < long / short < 2.6 and 1.8 < long_flops / short_flops < 2.6
    # A big vocabulary makes the output layers' weights outweigh a very short utterance's activations.
    big = _config(tmp_path, vocab_size=30000)
    weights = 2 * count_parameters(big.model)["total_params"]
    saved, _ = resources.measure(big, 0.3, 4.0)
    assert 0 < saved < weights / 2


def test_estimate_adds_up(tmp_path):
    config_path = tmp_path / "tiny.yaml"
    _config(tmp_path)
    r = _module().estimate(str(config_path), 40, gpus=2, ep_size=2, utt_seconds=2.0, tokens_per_second=4.0,
                           hours=10.0, mfu=0.5, peak_tflops=100.0)
    assert r["utterances_per_batch"] == 10  # 2000 frames / 200
    assert r["memory_gib"] == pytest.approx(sum(r["model_states_gib"].values()) + r["activations_gib"])
    assert r["gpu_hours"] == pytest.approx(r["train_tflop_per_audio_second"] * 10 * 3600 * 100 / 50 / 3600)
