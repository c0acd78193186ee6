"""A router is one file plus a name: the registry, and a router written outside the package trains,
exports and decodes with no other file touched (``tests/moe/hash_router.py``, named ``module:Class``)."""
from __future__ import annotations

import json
import os

import onnx
import onnxruntime as ort
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_asr.checkpoint import load_model
from moe_asr.cli import main
from moe_asr.export.bundle import export_model
from moe_asr.model.u2pp import build_model
from moe_asr.moe.config import MoEConfig
from moe_asr.moe.registry import ROUTERS, router_class
from moe_asr.moe.router import RouterExportError, TopKRouter
from moe_asr.schema import ConfigError
from moe_asr.train import load_experiment
from tests.engine.conftest import FSDD, REPO, SMALL_MODEL, data_overrides, run_training, train_cmd
from tests.helpers import tiny_config
from tests.moe.hash_router import HashRouter

HASH = "tests.moe.hash_router:HashRouter"
OPAQUE = "tests.moe.hash_router:OpaqueRouter"


def test_registry_names_and_import_paths_resolve():
    assert router_class("topk") is TopKRouter and ROUTERS["topk"].endswith(":TopKRouter")
    assert router_class(HASH) is HashRouter
    assert type(build_model(tiny_config()).moe_layers()[0].router) is TopKRouter  # the default


@pytest.mark.parametrize("name, message", [
    ("nope", "unknown router 'nope'"), ("tests.moe.hash_router:Missing", "cannot import"),
    ("moe_asr.moe.config:MoEConfig", "is not a subclass of moe_asr.moe.router.Router")])
def test_a_bad_router_name_fails_at_config_load_naming_the_key(name, message):
    with pytest.raises(ConfigError, match=r"model\.moe\.router: .*" + message):
        load_experiment(str(REPO / "conf/tiny_moe.yaml"), [f"model.moe.router={name}"])


def test_the_deepspeed_peer_needs_the_topk_router():
    with pytest.raises(ConfigError, match="router: topk"):
        MoEConfig(router=HASH, impl="deepspeed")


def test_a_router_without_onnx_form_is_refused_by_name(tmp_path):
    cfg = tiny_config()
    cfg.moe.router = OPAQUE
    with pytest.raises(RouterExportError, match=r"tests\.moe\.hash_router\.OpaqueRouter has no ONNX form"):
        export_model(build_model(cfg).eval(), tmp_path)


@pytest.mark.slow
def test_a_router_from_its_own_file_trains_on_two_expert_parallel_ranks_exports_and_decodes(
        small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = tmp_path / "run"
    overrides = {**SMALL_MODEL, **data_overrides(small_corpus), "model.moe.router": HASH, "parallel.ep_size": 2,
                 "train.max_steps": 2, "train.max_epochs": 1, "train.log_interval": 1}
    run_training(train_cmd(small_corpus, run, "ds_configs/zero1_cpu.json", overrides, 29641))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    routed = [events.Scalars(t)[-1].value for t in events.Tags()["scalars"] if t.startswith("moe_tokens/")]
    assert len(routed) == 6 * 4 and sum(routed) > 0, "the router's statistics reached the expert-load log"

    trained = load_model(run)
    routers = [layer.router for layer in trained.model.moe_layers()]
    assert routers and all(type(r) is HashRouter for r in routers)

    out = tmp_path / "onnx"
    export_model(trained.model, out, chunk_size=4, num_left_chunks=2)
    graph = onnx.load(str(out / "encoder_ctc.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "MoE" not in ops and {"TopK", "NonZero"} <= ops, "sparse, in standard ops"
    feats = torch.randn(1, 60, trained.model.cfg.input_dim)
    lengths = torch.tensor([60])
    got = ort.InferenceSession(str(out / "encoder_ctc.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"feats": feats.numpy(), "feats_lengths": lengths.numpy()})[0]
    with torch.no_grad():
        enc, _ = trained.model.encoder(feats, lengths, -1, -1)
        torch.testing.assert_close(torch.from_numpy(got), trained.model.ctc.log_softmax(enc), atol=1e-4, rtol=0)

    wavs = [str(FSDD / f"{k}.wav") for k in ("3_jackson_12", "0_george_0")]
    assert main(["recognize", "--model", str(run), *wavs, "--mode", "ctc_greedy_search,attention_rescoring",
                 "-o", str(tmp_path / "decode")]) == 0
    for mode in ("ctc_greedy_search", "attention_rescoring"):
        lines = (tmp_path / "decode" / mode / "text").read_text().splitlines()
        assert sorted(line.split()[0] for line in lines) == ["0_george_0", "3_jackson_12"]
