"""Config loading: every shipped YAML validates; mistakes name the file and the key."""
from pathlib import Path

import pytest

from moe_asr.engine.config import ConfigError, load_config

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.vocab_size > 2


@pytest.mark.parametrize("body,needle", [
    ("model:\n  vocab_size: 10\n  encoder:\n    num_blok: 2\n", "model.encoder: unknown key(s) ['num_blok']"),
    ("model:\n  vocab_size: ten\n", "model.vocab_size: expected an integer, got 'ten'"),
    ("model:\n  vocab_size: 10\n  moe:\n    top_k: 9\n", "model.moe.top_k: must be in [1, num_experts=8]"),
    ("model:\n  vocab_size: 10\n  encoder:\n    input_layer: conv3\n", "model.encoder.input_layer: 'conv3' is not one of"),
    ("model:\n  vocab_size: 10\n  moe:\n    ep_size: 3\n", "model.moe.ep_size: must divide num_experts=8"),
    ("model:\n  encoder: {}\n", "model.vocab_size: required key is missing"),
    ("model: [1, 2]\n", "model: expected a mapping"),
    ("model:\n  vocab_size: 10\n  causal: true\n", "model: unknown key(s) ['causal']"),
    ("model:\n  vocab_size: 10\n  encoder:\n    causal: 1\n", "model.encoder.causal: expected true/false"),
])
def test_errors_name_file_and_key(tmp_path, body, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert needle in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
