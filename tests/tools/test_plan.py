"""`moe-asr plan`: the command's options reach the planner, its text and JSON agree, bad layouts fail in one line."""
from __future__ import annotations

import json

import pytest

from moe_asr.cli import main
from moe_asr.plan import Layout, bucket_bytes, model_states, parameters
from moe_asr.train import load_experiment
from tests.engine.conftest import REPO

TINY = str(REPO / "conf/tiny_moe.yaml")
ARGS = [TINY, "--gpus-per-node", "2", "--nodes", "2", "--ep-size", "2", "--frames-per-batch", "600",
        "--utt-seconds", "3"]


def _plan(capsys, *extra: str) -> dict:
    assert main(["plan", *ARGS, *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_is_the_most_loaded_rank_of_the_layout_asked_for(capsys):
    r = _plan(capsys, "--zero-stage", "1", "--dtype", "fp16", "--set", "model.moe.top_k=1")
    layout = Layout(gpus_per_node=2, nodes=2, ep_size=2, zero_stage=1, dtype="fp16", frames_per_batch=600,
                    overlap_comm=False)
    assert r["layout"] == {**layout.__dict__, "world": 4}
    params = parameters(load_experiment(TINY, ["model.moe.top_k=1"]).model)
    per_rank = [model_states(params, layout, rank) for rank in range(4)]
    totals = [sum(sum(p.values()) for p in states.values()) for states in per_rank]
    assert r["model_states"] == per_rank[r["rank"]] and r["model_states_bytes"] == max(totals)
    assert r["buckets_bytes"] == bucket_bytes(layout) == 200_000_000 * 2
    assert r["config"]["top_k"] == 1  # --set reached the config
    assert r["activations"]["utterances_per_batch"] == 2.0  # 600 frames of 300-frame probes
    assert r["activations"]["bytes"] == 2 * r["activations"]["probe_bytes"] > 0
    assert r["total_bytes"] == r["model_states_bytes"] + r["buckets_bytes"] + r["activations"]["bytes"]
    # 8 encoder MoE layers (4 blocks x 2) and L2R + R2L decoder layers, each rows x top_k x d x 2 bytes x 1/2 leaving
    layers = r["all_to_all"]["layers"]
    assert len(layers) == 10
    enc = layers["encoder.encoders.0.feed_forward"]
    assert enc["rows"] == 2 * 74 and enc["forward_bytes"] == 2 * enc["rows"] * 1 * 128 * 2 // 2
    assert r["flops_per_step"] > 0


def test_ep_size_one_moves_nothing_and_a_ds_config_sets_stage_dtype_and_buckets(capsys):
    r = _plan(capsys, "--ep-size", "1", "--ds-config", str(REPO / "ds_configs/zero2_cpu.json"))
    assert (r["layout"]["zero_stage"], r["layout"]["dtype"], r["layout"]["ep_size"]) == (2, "fp32", 1)
    assert r["buckets_bytes"] == 50_000_000 * 4  # one fp32 bucket: overlap_comm is false there
    assert r["all_to_all"]["step_bytes"] == 0


def test_text_report_lists_every_part(capsys):
    assert main(["plan", *ARGS]) == 0
    out = capsys.readouterr().out
    for line in ("parameters", "gradients", "fp32 master weights", "Adam moments (fp32)", "gradient buckets",
                 "activations (measured)", "8 encoder MoE layers", "2 decoder MoE layers", "FLOPs per step"):
        assert line in out, line


@pytest.mark.parametrize("extra,message", [
    (["--ep-size", "3"], "parallel.ep_size"),                      # the config's own rule: 3 does not divide 8
    (["--gpus-per-node", "3", "--nodes", "1"], "--ep-size 2 must divide the 3 GPUs"),
    (["--zero-stage", "0"], "--zero-stage 0 trains in fp32 only"),
    (["--ds-config", str(REPO / "ds_configs/zero2_cpu.json"), "--dtype", "bf16"], "--ds-config sets"),
    (["--set", "model.moe.top_k=9"], "model.moe.top_k"),
])
def test_bad_input_fails_in_one_line(capsys, extra, message):
    assert main(["plan", *ARGS, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moe-asr plan: error:") and message in err, err
