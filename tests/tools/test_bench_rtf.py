"""bench-rtf: the weight-read counter counts what the routers touched; every requested cell is measured."""
import json
from pathlib import Path

import torch

from moe_asr.cli import main
from moe_asr.model.u2pp import build_model
from moe_asr.tools.bench_rtf import WeightReads
from tests.helpers import tiny_config

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_one_frame_reads_the_non_expert_weights_and_top_k_experts_per_layer():
    model = build_model(tiny_config(num_experts=4, top_k=2)).eval()
    reads = WeightReads(model)
    layers = model.encoder.encoders
    per_expert = sum(p.numel() * 4 for p in layers[0].feed_forward.experts.parameters()) // 4
    with torch.inference_mode():
        reads.encoder_calls()
        out, _ = model.encode(torch.randn(1, 7, 20), torch.tensor([7]), -1, -1)  # 7 frames -> 1 after 4x
    assert out.shape[1] == 1
    moe_layers = 2 * len(layers)  # macaron: two MoE FFNs a block
    assert reads.bytes == reads.encoder_bytes + moe_layers * 2 * per_expert
    experts = sum(p.numel() * 4 for layer in model.moe_layers() for p in layer.experts.parameters())
    assert reads.encoder_bytes + reads.decoder_bytes + experts == sum(p.numel() * 4 for p in model.parameters())
    reads.close()


def test_every_cell_is_measured_side_by_side(tmp_path, capsys):
    out = tmp_path / "rtf.json"
    assert main(["bench-rtf", str(CONF / "tiny_dense.yaml"), str(CONF / "tiny_moe.yaml"), "--seconds", "0.5",
                 "--rounds", "1", "--streams", "1,2", "--contexts", "full,4/1", "--threads", "1",
                 "--modes", "encoder,ctc_greedy_search", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio: tiny_moe / tiny_dense" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["context"], r["streams"]) for r in rows] == [
        (m, c, n) for m in ("encoder", "ctc_greedy_search") for c in ("full", "chunk4_left1") for n in (1, 2)]
    for r in rows:
        dense, moe = r["models"]["tiny_dense"], r["models"]["tiny_moe"]
        assert not dense["has_experts"] and moe["has_experts"]
        assert min(dense["rtf"], moe["rtf"], moe["floor_rtf"]) > 0
        assert moe["weight_bytes_read"] > 0


def test_bad_options_are_one_line(capsys):
    assert main(["bench-rtf", str(CONF / "tiny_moe.yaml"), "--contexts", "full,x"]) == 1
    assert capsys.readouterr().err.strip() == "moe-asr bench-rtf: error: --contexts: 'x' is not full, C or C/L"
