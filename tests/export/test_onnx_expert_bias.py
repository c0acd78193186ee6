"""A model whose routers carry a nonzero expert bias exports to graphs that compute what it computes.

Such layers export the router's biased choice and its plain-logit weights (each expert on its
own tokens). The bias here changes many tokens' experts, so a graph that dropped it, or weighted
by the biased logits, would not equal the eager model.
"""
from __future__ import annotations

import copy

import onnx
import onnxruntime as ort
import pytest
import torch

from moe_asr.export.bundle import export_model
from moe_asr.model.u2pp import build_model
from tests.export.test_onnx import check_decoders
from tests.helpers import tiny_config

CHUNK, LEFT = 4, 2


def _biased_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(tiny_config(num_experts=4)).eval()
    generator = torch.Generator().manual_seed(5)
    for layer in model.moe_layers():
        layer.router.choice_bias.copy_(torch.randn(4, generator=generator))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _biased_model()
    out = tmp_path_factory.mktemp("biased")
    export_model(model, out, CHUNK, LEFT)
    return model, out


def _run(path, feed: dict) -> list:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in feed.items()})


def _unbiased_copy(model: torch.nn.Module) -> torch.nn.Module:
    plain = copy.deepcopy(model)
    for layer in plain.moe_layers():
        layer.router.choice_bias.zero_()
    return plain


def test_biased_layers_leave_the_moe_node_for_standard_ops(exported):
    model, out = exported
    for name in ("encoder_ctc", "streaming_encoder", "decoder_l2r"):
        ops = [n.op_type for n in onnx.load(str(out / f"{name}.onnx")).graph.node]
        assert "MoE" not in ops and "NonZero" in ops and "TopK" in ops, name


def test_encoder_graph_equals_eager_with_the_biased_choice(exported):
    model, out = exported
    torch.manual_seed(1)
    feats, lengths = torch.randn(3, 90, 20), torch.tensor([90, 61, 45])
    got = _run(out / "encoder_ctc.onnx", {"feats": feats, "feats_lengths": lengths})
    with torch.no_grad():
        enc, mask = model.encoder(feats, lengths, -1, -1)
        plain, _ = _unbiased_copy(model).encoder(feats, lengths, -1, -1)
    valid = mask.squeeze(1)
    assert (plain - enc)[valid].abs().max() > 1e-2, "the bias must change the routing for this test to mean anything"
    torch.testing.assert_close(torch.from_numpy(got[2])[valid], enc[valid], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(got[0])[valid], model.ctc.log_softmax(enc)[valid], atol=1e-4, rtol=0)


def test_decoder_graph_equals_eager_with_the_biased_choice(exported):
    model, out = exported
    check_decoders(model, out)