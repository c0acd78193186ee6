"""Config loading: every shipped YAML validates; mistakes name the file and the key."""
from pathlib import Path

import pytest

from moe_asr.run.config import ConfigError, load_config, save_config
from moe_asr.model.u2pp import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"
EXAMPLES = CONF.parent / "examples"


@pytest.mark.parametrize("path", sorted([*CONF.glob("*.yaml"), *EXAMPLES.glob("*/conf/*.yaml")]),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.vocab_size == "auto" or cfg.model.vocab_size > 2


def test_auto_vocab_size_is_the_symbol_table_size(tmp_path):
    units = tmp_path / "units.txt"
    units.write_text("<blank> 0\n<unk> 1\nyes 2\nno 3\n<sos/eos> 4\n")
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  vocab_size: auto\ndata:\n  tokenizer: {{symbol_table: {units}}}\n")
    cfg = load_config(path)
    assert cfg.model.vocab_size == 5
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").model.vocab_size == 5  # what a run records is the number
    path.write_text("model:\n  vocab_size: auto\n")
    unresolved = load_config(path).model
    assert unresolved.vocab_size == "auto"
    with pytest.raises(ConfigError, match="model.vocab_size: is auto but no symbol table is known"):
        build_model(unresolved)


def test_auto_vocab_size_reads_the_table_as_the_tokenizer_does(tmp_path):
    """A malformed table fails when the config loads, naming the file and line, not when training starts."""
    units = tmp_path / "units.txt"
    units.write_text("<blank> 0\n<unk> 1\nyes\n<sos/eos> 3\n")
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  vocab_size: auto\ndata:\n  tokenizer: {{symbol_table: {units}}}\n")
    with pytest.raises(ConfigError, match=f"model.vocab_size: auto reads the symbol table: {units}:3: expected"):
        load_config(path)
    units.write_text("<blank> 0\n<unk> 1\nyes 2\n")  # no <sos/eos> at the last id
    with pytest.raises(ConfigError, match="needs"):
        load_config(path)


@pytest.mark.parametrize("body,needle", [
    ("model:\n  vocab_size: 10\n  encoder:\n    num_blok: 2\n", "model.encoder: unknown key(s) ['num_blok']"),
    ("model:\n  vocab_size: ten\n", "model.vocab_size: 'ten' is not int or 'auto'"),
    ("model:\n  vocab_size: auto\ndata:\n  tokenizer: {symbol_table: /nonexistent/units.txt}\n",
     "model.vocab_size: auto reads the symbol table: /nonexistent/units.txt: symbol table not found"),
    ("model:\n  vocab_size: 10\n  moe:\n    top_k: 9\n", "model.moe.top_k: must be in [1, num_experts=8]"),
    ("model:\n  vocab_size: 10\n  encoder:\n    input_layer: conv3\n", "model.encoder.input_layer: 'conv3' is not one of"),
    ("model:\n  vocab_size: 10\nparallel:\n  ep_size: 3\n", "parallel.ep_size: must divide model.moe.num_experts=8"),
    ("model:\n  vocab_size: 10\n  moe: {impl: loop}\nparallel:\n  ep_size: 2\n",
     "parallel.ep_size: expert parallelism (ep_size=2) needs model.moe.impl: grouped, got loop"),
    ("model:\n  vocab_size: 10\n  moe: {impl: deepspeed}\nparallel:\n  ep_size: 2\n",
     "parallel.ep_size: expert parallelism (ep_size=2) needs model.moe.impl: grouped, got deepspeed"),
    ("model:\n  vocab_size: 10\n  moe: {ep_size: 2}\nparallel:\n  ep_size: 4\n",
     "model.moe.ep_size: 2 conflicts with parallel.ep_size: 4; the key moved to parallel.ep_size"),
    ("parallel:\n  ep_size: 0\nmodel:\n  vocab_size: 10\n", "parallel.ep_size: must be >= 1, got 0"),
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


def test_a_config_from_before_the_parallel_section_reads_its_ep_size_there_and_says_so(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  vocab_size: 10\n  moe:\n    num_experts: 4\n    ep_size: 2\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(path)
    assert cfg.parallel.ep_size == 2 and not hasattr(cfg.model.moe, "ep_size")
    assert "model.moe.ep_size is now parallel.ep_size: read as parallel.ep_size: 2" in caplog.text
