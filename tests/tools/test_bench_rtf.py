"""bench-rtf: the weight-read counter counts what the routers touched; every requested cell is measured;
with --onnx the exported encoder graphs are timed beside the eager rows once they match them."""
import json
from pathlib import Path

import pytest
import torch

from moe_asr.cli import main
from moe_asr.model.u2pp import build_model
from moe_asr.tools import bench_rtf
from moe_asr.export import onnx_runtime
from moe_asr.export.onnx_runtime import check_close, check_equal
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


def test_onnx_cells_are_checked_then_timed_beside_the_eager_ones(tmp_path, capsys, monkeypatch):
    """Float graphs checked to 1e-4, their int8 twins (--int8) to their relative tolerance, then both timed."""
    checked = []

    def recorded(check):
        def wrapper(got, eager, mask, where):
            checked.append(where)
            check(got, eager, mask, where)
        return wrapper

    monkeypatch.setattr(onnx_runtime, "check_equal", recorded(check_equal))
    monkeypatch.setattr(onnx_runtime, "check_close", recorded(check_close))
    out = tmp_path / "rtf.json"
    assert main(["bench-rtf", str(CONF / "tiny_dense.yaml"), str(CONF / "tiny_moe.yaml"), "--seconds", "0.5",
                 "--rounds", "1", "--streams", "2", "--contexts", "full,4,4/1", "--threads", "1",
                 "--modes", "encoder", "--onnx", "--int8", "--json", str(out)]) == 0
    assert checked == [f"{m} {c} N=2{kind}" for c in ("full", "chunk4_left1") for m in ("tiny_dense", "tiny_moe")
                       for kind in ("", " (int8)")]
    printed = capsys.readouterr().out
    assert printed.count("(onnx)") == 2 and printed.count("(onnx int8)") == 2
    assert "onnx skipped at chunk4 for tiny_dense, tiny_moe: no left limit" in printed
    result = json.loads(out.read_text())
    assert result["onnx_runtime"].startswith("ONNX Runtime ")
    cells = {r["context"]: r["models"] for r in result["rows"]}
    for context in ("full", "chunk4_left1"):
        for model in cells[context].values():
            for kind in ("onnx", "onnx_int8"):
                assert min(model[kind]["rtf"], model[kind]["min"]) > 0
                assert model[kind]["eager_over_onnx"] == pytest.approx(model["rtf"] / model[kind]["rtf"])
    assert all("bounded cache" in m[k]["skipped"] for m in cells["chunk4"].values() for k in ("onnx", "onnx_int8"))


def test_an_onnx_output_off_by_more_than_1e_4_on_a_valid_frame_is_refused():
    eager = torch.zeros(2, 3, 4)
    mask = torch.tensor([[[True, True, True]], [[True, False, False]]])
    got = eager.numpy().copy()
    got[1, 2] = 1.0  # padding: not compared
    check_equal(got, eager, mask, "m full N=2")
    got[1, 0, 3] = 2e-4
    with pytest.raises(ValueError, match=r"^m full N=2: ONNX encoder output differs from eager by 2.00e-04"):
        check_equal(got, eager, mask, "m full N=2")


def test_an_int8_output_off_by_more_than_its_relative_rms_is_refused():
    eager = torch.ones(1, 4, 2)
    mask = torch.tensor([[[True, True, True, False]]])
    got = eager.numpy().copy()
    got[0, 3] = 9.0  # padding: not compared
    got[0, 0, 0] = 1.08  # RMS of the difference 0.08 / sqrt(6) = 0.033
    check_close(got, eager, mask, "m full N=1 (int8)")
    got[0, 0, 0] = 1.2  # 0.082
    with pytest.raises(ValueError, match=r"^m full N=1 \(int8\): ONNX encoder output is off eager by 0.082"):
        check_close(got, eager, mask, "m full N=1 (int8)")


def test_bad_options_are_one_line(capsys):
    assert main(["bench-rtf", str(CONF / "tiny_moe.yaml"), "--contexts", "full,x"]) == 1
    assert capsys.readouterr().err.strip() == "moe-asr bench-rtf: error: --contexts: 'x' is not full, C or C/L"
    assert main(["bench-rtf", str(CONF / "tiny_moe.yaml"), "--onnx", "--modes", "ctc_greedy_search"]) == 1
    assert capsys.readouterr().err.strip().startswith("moe-asr bench-rtf: error: --onnx times ONNX Runtime on CPU")


def test_vs_loop_times_the_same_model_with_the_loop_and_a_dense_moe_pair_gets_its_flop_bound(
        tmp_path, capsys, monkeypatch):
    """--vs-loop adds the MoE model run with moe.impl: loop in the same rounds (its layers switched for its
    turn and back), loop/ours beside it; a dense/MoE pair's encoder rows carry 1 + s (r - 1)."""
    impls = []
    real = bench_rtf.encoder_out

    def spy(model, *a):
        impls.append({layer.impl for layer in model.moe_layers() if layer.router is not None})
        return real(model, *a)

    monkeypatch.setattr(bench_rtf, "encoder_out", spy)
    out = tmp_path / "rtf.json"
    assert main(["bench-rtf", str(CONF / "tiny_dense.yaml"), str(CONF / "tiny_moe.yaml"), "--seconds", "0.5",
                 "--rounds", "2", "--streams", "1", "--contexts", "full,4/1", "--threads", "1", "--modes",
                 "encoder", "--vs-loop", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loop/ours" in printed and "bound" in printed
    # per round: dense (no MoE layers), the MoE as built (grouped), then its loop twin
    assert impls[:3] == [set(), {"grouped"}, {"loop"}] and impls[3:6] == impls[:3]
    for r in json.loads(out.read_text())["rows"]:
        twin, moe = r["models"]["tiny_moe[loop]"], r["models"]["tiny_moe"]
        assert twin["loop_over_ours"] > 0 and twin["has_experts"]
        b = r["flop_bound"]
        assert b["flops_ratio"] == 1  # the tiny pair: equal active FFN FLOPs
        assert 0 < b["dense_ffn_share"] < 1 and b["bound"] == pytest.approx(1 + b["dense_ffn_share"] * 0)


def test_a_dense_model_reads_all_its_weights_every_call():
    """No router: its FFNs are read by every call, so its floor counts them (every weight of the encoder+CTC)."""
    model = build_model(tiny_config(num_experts=1, top_k=1)).eval()
    reads = WeightReads(model)
    assert not reads.has_experts
    enc = sum(p.numel() * 4 for m in (model.encoder, model.ctc) for p in m.parameters())
    assert reads.encoder_bytes == enc and reads.decoder_bytes == sum(p.numel() * 4 for p in model.decoder.parameters())
    reads.close()
