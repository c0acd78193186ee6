"""`moe-asr export --int8`: each graph's int8 twin computes what the eager model does, within int8's error.

The int8 graphs quantize every weight MatMul (experts included) and keep the routers' logits in
float and the MoE sparse. Random tiny models (4 experts top-2) and their graphs run in ONNX Runtime
on padded batches; the error is stated relative to the output's size (RMS), since int8 rounds
every weight to 1/127 of its matrix's largest.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moe_asr.export.bundle import export_model, int8_path
from moe_asr.export.graphs import StreamingEncoder
from moe_asr.export.quantize import router_matmuls
from moe_asr.model.u2pp import build_model
from tests.export.test_onnx import check_decoders, run_encoder_ctc
from tests.helpers import tiny_config

CHUNK, LEFT = 4, 2
# Measured on these models: relative RMS error 0.01-0.02 of the encoder output and CTC log-probs.
RELATIVE_RMS = 0.05
GRAPHS = ("encoder_ctc", "streaming_encoder", "decoder_l2r", "decoder_r2l")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(tiny_config(num_experts=4)).eval()
    out = tmp_path_factory.mktemp("int8")
    summary = export_model(model, out, CHUNK, LEFT, int8=True)
    return model, out, summary


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _relative_rms(got: np.ndarray, expected: torch.Tensor, rows: torch.Tensor) -> float:
    a, e = torch.from_numpy(got)[rows].double(), expected.detach()[rows].double()
    return float((a - e).square().mean().sqrt() / e.square().mean().sqrt())


def test_every_graph_has_an_int8_twin_with_the_same_inputs_outputs(exported):
    _, out, summary = exported
    for name in GRAPHS:
        float_file, int8_file = out / f"{name}.onnx", int8_path(out / f"{name}.onnx")
        assert f"{name}.int8.onnx" in summary["files"]
        described = json.loads((out / "export.json").read_text())["files"]
        assert described[f"{name}.int8.onnx"] == described[f"{name}.onnx"]
        assert int8_file.stat().st_size < float_file.stat().st_size, name


def test_int8_quantizes_experts_keeps_routers_float_and_stays_sparse(exported):
    model, out, _ = exported
    for name in ("encoder_ctc", "streaming_encoder"):
        fp = onnx.load(str(out / f"{name}.onnx")).graph
        q = onnx.load(str(out / f"{name}.int8.onnx")).graph
        ops = [n.op_type for n in q.node]
        experts = [i.name for i in fp.initializer if ".experts." in i.name and i.name.endswith((".w1", ".w2"))]
        q_inits = {i.name: i for i in q.initializer}
        assert experts and all(w not in q_inits for w in experts), "a float expert weight is left"
        assert all(q_inits[f"{w}_quantized"].data_type == onnx.TensorProto.INT8 for w in experts)
        assert ops.count("NonZero") == [n.op_type for n in fp.node].count("NonZero") > 0
        routers = router_matmuls(q)
        assert len(routers) == ops.count("TopK") > 0
        assert ops.count("MatMul") >= len(routers)
        assert "MatMulInteger" in ops


@pytest.mark.parametrize("batch, frames", [(3, 90), (1, 31)])
def test_int8_encoder_ctc_is_eager_within_its_tolerance(exported, batch, frames):
    model, out, _ = exported
    got, enc, log_probs, valid = run_encoder_ctc(out / "encoder_ctc.int8.onnx", model, batch, frames)
    assert _relative_rms(got[2], enc, valid) < RELATIVE_RMS
    assert _relative_rms(got[0], log_probs, valid) < RELATIVE_RMS


def test_int8_streaming_graph_is_eager_within_its_tolerance(exported):
    model, out, _ = exported
    session = _session(out / "streaming_encoder.int8.onnx")
    w = model.encoder.stream_windows(CHUNK, LEFT)
    torch.manual_seed(2)
    feats = torch.randn(2, 60, 20)
    with torch.no_grad():
        full, _ = model.encoder.forward_chunk_by_chunk(feats, torch.tensor([60, 60]), CHUNK, LEFT)
    feed = dict(zip(["offset", "cache_mask", "att_cache", "cnn_cache"],
                    (t.numpy() for t in StreamingEncoder(model, CHUNK, LEFT).initial_state(2))))
    outs = []
    for start in range(0, 60 - w.context + 1, w.stride):
        chunk = feats[:, start:start + w.window]
        got = session.run(None, {"chunk": chunk.numpy(), "chunk_lengths": np.full(2, chunk.shape[1]), **feed})
        outs.append(got[1])
        feed = dict(zip(feed, got[3:]))
    got = np.concatenate(outs, axis=1)
    assert got.shape == tuple(full.shape)
    assert _relative_rms(got, full, torch.ones(full.shape[:2], dtype=torch.bool)) < RELATIVE_RMS


def test_int8_decoders_are_eager_within_their_tolerance(exported):
    model, out, _ = exported

    def within_tolerance(got: np.ndarray, expected: torch.Tensor, valid: torch.Tensor) -> None:
        assert _relative_rms(got, expected, valid) < RELATIVE_RMS

    check_decoders(model, out, suffix=".int8.onnx", compare=within_tolerance)
