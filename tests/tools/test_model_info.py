"""model-info: the paper shapes hit their parameter budgets; counts are exact."""
import json
from pathlib import Path

from moe_asr.cli import main
from moe_asr.model.u2pp import build_model
from moe_asr.model.parameters import count_parameters
from tests.helpers import tiny_config

CONF = Path(__file__).resolve().parents[2] / "conf"


def _info(capsys, name: str) -> dict:
    assert main(["model-info", str(CONF / name), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_paper_shapes(capsys):
    dense = _info(capsys, "paper_dense_225m.yaml")
    moe = _info(capsys, "paper_moe_1b.yaml")
    assert abs(dense["total_params"] / 225e6 - 1) < 0.03
    assert abs(moe["total_params"] / (4.7 * 225e6) - 1) < 0.03
    assert dense["active_params"] == dense["total_params"]
    assert moe["moe_layers"] == 12 * 2 + 3 + 3


def test_counts_match_a_real_model():
    cfg = tiny_config(num_experts=4, top_k=2)
    model = build_model(cfg)
    info = count_parameters(tiny_config(num_experts=4, top_k=2))
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for m in model.moe_layers() for p in m.experts.parameters())
    assert info["active_params"] == info["total_params"] - experts // 2
    assert sum(info["breakdown"].values()) == info["total_params"]
    assert info["breakdown"]["encoder.experts"] + info["breakdown"]["decoder.experts"] == experts


def test_text_output(capsys):
    assert main(["model-info", str(CONF / "tiny_moe.yaml")]) == 0
    out = capsys.readouterr().out
    assert "active / token" in out and "encoder.experts" in out


def test_auto_vocabulary_needs_a_symbol_table(tmp_path, capsys):
    config = tmp_path / "auto.yaml"
    config.write_text((CONF / "tiny_moe.yaml").read_text().replace("vocab_size: 20", "vocab_size: auto"))
    assert main(["model-info", str(config)]) == 2
    assert "model.vocab_size is auto: pass --symbol-table" in capsys.readouterr().err
    units = tmp_path / "units.txt"
    units.write_text("".join(f"t{i} {i}\n" for i in range(20)))  # no special symbols: not a symbol table
    assert main(["model-info", str(config), "--symbol-table", str(units)]) == 2
    assert f"reads the symbol table: {units}: needs <blank>=0" in capsys.readouterr().err
    units.write_text("<blank> 0\n<unk> 1\n" + "".join(f"t{i} {i}\n" for i in range(2, 19)) + "<sos/eos> 19\n")
    assert main(["model-info", str(config), "--json", "--symbol-table", str(units)]) == 0
    assert json.loads(capsys.readouterr().out) == _info(capsys, "tiny_moe.yaml")
