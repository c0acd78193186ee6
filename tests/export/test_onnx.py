"""Every exported graph computes what the eager model does, with its MoE layers kept sparse.

Small random models (tests/helpers.py): 4 experts top-2, 8 experts top-2 with
gelu experts, and a dense one.
The graphs run in ONNX Runtime on padded batches of sizes and lengths other
than the ones they were traced with.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moe_asr.export.bundle import export_model
from moe_asr.export.sherpa import SherpaOptions
from moe_asr.cli import main
from moe_asr.export.graphs import StreamingEncoder, lengths_mask
from moe_asr.model.u2pp import build_model
from moe_asr.moe.config import MoEConfig
from tests.helpers import tiny_config

CHUNK, LEFT = 4, 2


def _model(kind: str, rel_pos_shift: bool = True) -> torch.nn.Module:
    cfg = tiny_config(num_experts=8 if kind == "gelu" else 4)
    if kind == "dense":
        cfg.moe = MoEConfig(num_experts=1, top_k=1)
    if kind == "gelu":
        cfg.encoder.activation = cfg.decoder.activation = "gelu"
    cfg.encoder.rel_pos_shift = rel_pos_shift
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.fixture(scope="module", params=["moe", "gelu", "dense"])
def exported(request, tmp_path_factory):
    model = _model(request.param)
    out = tmp_path_factory.mktemp(request.param)
    export_model(model, out, CHUNK, LEFT)
    return request.param, model, out


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _close(actual: np.ndarray, expected: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Equal to 1e-4 (on the ``rows`` [B, T] marked valid, when given)."""
    a, e = torch.from_numpy(actual), expected.detach()
    if rows is not None:
        a, e = a[rows], e[rows]
    torch.testing.assert_close(a, e, atol=1e-4, rtol=0)


def run_encoder_ctc(graph: Path, model, batch: int, frames: int) -> tuple[list[np.ndarray], torch.Tensor,
                                                                          torch.Tensor, torch.Tensor]:
    """The encoder_ctc graph and eager on one padded batch (seeded): the graph's outputs, eager's encoder
    output and CTC log-probabilities, and the valid [B, T] rows; the graph's lengths are checked here."""
    torch.manual_seed(1)
    feats = torch.randn(batch, frames, 20)
    lengths = torch.randint(frames // 2, frames + 1, (batch,))
    lengths[0] = frames
    got = _session(graph).run(None, {"feats": feats.numpy(), "feats_lengths": lengths.numpy()})
    with torch.no_grad():
        enc, mask = model.encoder(feats, lengths, -1, -1)
    valid = mask.squeeze(1)
    assert got[1].tolist() == valid.sum(1).tolist()
    return got, enc, model.ctc.log_softmax(enc), valid


@pytest.mark.parametrize("batch, frames", [(3, 90), (1, 31)])
def test_encoder_ctc_equals_eager_on_padded_batches(exported, batch, frames):
    _, model, out = exported
    got, enc, log_probs, valid = run_encoder_ctc(out / "encoder_ctc.onnx", model, batch, frames)
    _close(got[0], log_probs, valid)
    _close(got[2], enc, valid)


def test_streaming_graph_equals_eager_forward_chunk_chunk_by_chunk(exported):
    _, model, out = exported
    session = _session(out / "streaming_encoder.onnx")
    w = model.encoder.stream_windows(CHUNK, LEFT)
    torch.manual_seed(2)
    feats, lengths = torch.randn(3, 75, 20), torch.tensor([75, 52, 30])
    state = model.encoder.init_state(3)
    names = ["offset", "cache_mask", "att_cache", "cnn_cache"]
    feed = {k: v.numpy() for k, v in zip(names, StreamingEncoder(model, CHUNK, LEFT).initial_state(3))}
    starts = list(range(0, feats.shape[1] - w.context + 1, w.stride))
    assert feats.shape[1] - starts[-1] < w.window, "the last window is a short one"
    for start in starts:
        end = min(start + w.window, feats.shape[1])
        lens = (lengths - start).clamp(0, end - start)
        with torch.no_grad():
            enc, state = model.encoder.forward_chunk(feats[:, start:end], lens, state, w.required_cache_size)
        got = session.run(None, {"chunk": feats[:, start:end].numpy(), "chunk_lengths": lens.numpy(), **feed})
        valid = torch.arange(enc.shape[1])[None] < torch.from_numpy(got[2])[:, None]
        _close(got[0], model.ctc.log_softmax(enc), valid)
        _close(got[1], enc, valid)
        assert got[3].tolist() == state.offset.tolist()
        feed = dict(zip(names, got[3:]))
    assert feed["cache_mask"].shape[1] == w.required_cache_size


def test_streaming_graph_follows_wenet_style_absolute_positions(tmp_path):
    """With ``rel_pos_shift: false`` the offset input decides the position encodings."""
    model = _model("moe", rel_pos_shift=False)
    export_model(model, tmp_path, CHUNK, LEFT)
    session = _session(tmp_path / "streaming_encoder.onnx")
    w = model.encoder.stream_windows(CHUNK, LEFT)
    torch.manual_seed(3)
    feats = torch.randn(1, 60, 20)
    with torch.no_grad():
        full, _ = model.encoder.forward_chunk_by_chunk(feats, torch.tensor([60]), CHUNK, LEFT)
    feed = dict(zip(["offset", "cache_mask", "att_cache", "cnn_cache"],
                    (t.numpy() for t in StreamingEncoder(model, CHUNK, LEFT).initial_state(1))))
    outs = []
    for start in range(0, 60 - w.context + 1, w.stride):
        chunk = feats[:, start:start + w.window]
        got = session.run(None, {"chunk": chunk.numpy(), "chunk_lengths": np.array([chunk.shape[1]]), **feed})
        outs.append(got[1])
        feed = dict(zip(feed, got[3:]))
    _close(np.concatenate(outs, axis=1), full)


def test_decoders_equal_eager_on_padded_batches(exported):
    _, model, out = exported
    check_decoders(model, out)


def check_decoders(model: torch.nn.Module, out, names: tuple[str, ...] = ("l2r", "r2l"), suffix: str = ".onnx",
                   compare: Callable[[np.ndarray, torch.Tensor, torch.Tensor], None] = _close) -> None:
    """Each exported decoder of ``names`` (``decoder_<name><suffix>``) against the eager one on a padded batch:
    ``compare(graph's, eager's, valid positions)``, by default equal to 1e-4 on the real positions."""
    decoders = {"l2r": model.decoder.left_decoder, "r2l": model.decoder.right_decoder}
    torch.manual_seed(4)
    memory, memory_lens = torch.randn(3, 17, 32), torch.tensor([17, 9, 12])
    ys_in = torch.randint(0, model.vocab_size, (3, 7))
    ys_in[:, 0] = model.sos
    ys_lens = torch.tensor([7, 3, 5])
    valid = torch.arange(7)[None] < ys_lens[:, None]
    for name in names:
        decoder = decoders[name]
        got = _session(out / f"decoder_{name}{suffix}").run(None, {
            "encoder_out": memory.numpy(), "encoder_out_lens": memory_lens.numpy(), "ys_in": ys_in.numpy(),
            "ys_in_lens": ys_lens.numpy()})[0]
        with torch.no_grad():
            expected = decoder(memory, lengths_mask(memory_lens, 17), ys_in, ys_lens).log_softmax(-1)
        compare(got, expected, valid)


def _consumers(graph: onnx.GraphProto) -> dict[str, set[str]]:
    uses: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            uses.setdefault(name, set()).add(node.op_type)
    return uses


def test_moe_stays_sparse(exported):
    """No node multiplies all experts' weights: each expert's weights feed one MatMul, run on the rows
    a Gather took (the tokens NonZero selected for that expert), and no contrib node is used."""
    kind, model, out = exported
    layers = len(model.moe_layers())
    for name in ("encoder_ctc", "streaming_encoder", "decoder_l2r"):
        graph = onnx.load(str(out / f"{name}.onnx")).graph
        ops = [n.op_type for n in graph.node]
        assert all(n.domain in ("", "ai.onnx") for n in graph.node), name
        per_graph = sum(1 for m in (model.encoder if "encoder" in name else model.decoder.left_decoder).modules()
                        if m in model.moe_layers())
        experts = {i.name for i in graph.initializer if i.name.endswith((".w1", ".w2")) and ".experts." in i.name}
        if kind == "dense":
            assert "NonZero" not in ops and "TopK" not in ops
            continue
        assert layers > per_graph > 0
        assert ops.count("NonZero") == per_graph * model.cfg.moe.num_experts, name
        assert len(experts) == 2 * per_graph * model.cfg.moe.num_experts, name
        producer = {o: n for n in graph.node for o in n.output}
        for node in graph.node:
            if node.op_type == "MatMul" and node.input[1] in experts:
                first = node.input[1].endswith(".w1")
                assert not first or producer[node.input[0]].op_type == "Gather", (name, node.name)
        assert all(_consumers(graph)[w] == {"MatMul"} for w in experts), name


def test_a_full_context_model_exports_without_streaming_graphs(tmp_path, capsys):
    model = build_model(tiny_config(causal=False)).eval()
    summary = export_model(model, tmp_path, CHUNK, LEFT, sherpa_onnx=SherpaOptions({f"t{i}": i for i in range(12)}))
    assert sorted(summary["files"]) == ["decoder_l2r.onnx", "decoder_r2l.onnx", "encoder_ctc.onnx",
                                        "sherpa-onnx/model.onnx"]
    assert "STREAMING = False" in (tmp_path / "sherpa-onnx" / "decode.py").read_text()
    assert "causal" in summary["skipped"]["streaming"]
    assert (tmp_path / "sherpa-onnx" / "tokens.txt").read_text().splitlines()[:2] == ["t0 0", "t1 1"]
    assert main(["export", "--model", str(tmp_path / "none.pt"), "-o", str(tmp_path), "--num-left-chunks", "-1"]) == 1
    assert "--num-left-chunks must be >= 0" in capsys.readouterr().err
