"""A trained expert-parallel run reads back without DeepSpeed and computes what the live training model did.

One 2-rank run (ZeRO 2, ep_size 2: each rank holds half the experts of every
layer) leaves a DeepSpeed checkpoint and, from the live model after its last
step, the outputs on a fixed batch (``train_and_snapshot.py``). A fresh
process that imports only the model, MoE, decode and checkpoint packages
loads the run every way a user may point at it and must compute the same
encoder outputs, CTC posteriors and hypotheses, with ``deepspeed`` never
imported.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_asr.checkpoint import load_model, read_model_state, save_model
from tests.checkpoint.snapshot import METHODS, WAVS, assert_same, snapshot
from tests.engine.conftest import REPO, SMALL_MODEL, data_overrides, run_training, train_cmd

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def trained_run(small_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ep2_zero2")
    overrides = {**SMALL_MODEL, **data_overrides(small_corpus), "parallel.ep_size": 2, "train.max_steps": 3,
                 "train.max_epochs": 1, "train.log_interval": 1, "train.warmup_steps": 1}
    run_training(train_cmd(small_corpus, out, str(REPO / "ds_configs/zero2_cpu.json"), overrides, 29655,
                           script=str(HERE / "train_and_snapshot.py")))
    return out


@pytest.mark.slow
def test_loads_without_deepspeed_and_equals_the_live_model(trained_run):
    tag = (trained_run / "checkpoints" / "latest").read_text().strip()
    code = f"""
import sys
from pathlib import Path
import torch
import moe_asr.model, moe_asr.moe, moe_asr.decode
from moe_asr.checkpoint import load_model
from moe_asr.moe.layer import MoEFeedForward
sys.path.insert(0, {str(REPO)!r})
from tests.checkpoint.snapshot import assert_same, snapshot

run = Path({str(trained_run)!r})
live = torch.load(run / "live.pt", weights_only=False)
ways = [(run, None), (run, {tag!r}), (run / "checkpoints", None), (run / "checkpoints" / {tag!r}, None)]
for path, tag in ways:
    loaded = load_model(path, tag)
    assert loaded.source == run / "checkpoints" / {tag!r}, loaded.source
    layers = [m for m in loaded.model.modules() if isinstance(m, MoEFeedForward)]
    assert layers and all(type(m) is MoEFeedForward and m.experts.num_local == m.num_experts for m in layers)
    assert not [p for p in loaded.model.parameters() if hasattr(p, "allreduce") or hasattr(p, "group_name")]
    assert_same(live, snapshot(loaded.model, loaded.config))
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "deepspeed")
assert not leaked, leaked[:5]
print("loaded", len(ways), "ways")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded 4 ways" in result.stdout


@pytest.mark.slow
def test_consolidated_file_round_trip(trained_run, tmp_path):
    ms = read_model_state(trained_run)
    experts = next(v for k, v in ms.state.items() if k.endswith("experts.w1"))
    assert experts.shape[0] == SMALL_MODEL["model.moe.num_experts"], "every expert, from both ranks' files"
    ms.config.data.tokenizer.symbol_table = str(tmp_path / "moved_away" / "units.txt")  # the file alone decodes
    path = save_model(tmp_path / "model.pt", ms.state, ms.config, ms.tokenizer)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"], "no partial file left behind"
    loaded = load_model(path)
    assert loaded.source == path
    assert loaded.tokenizer.symbol_table == ms.tokenizer.symbol_table and loaded.tokenizer.vocab_size > 3
    live = torch.load(trained_run / "live.pt", weights_only=False)
    assert_same(live, snapshot(loaded.model, loaded.config))


@pytest.mark.slow
def test_ds_to_pt_then_recognize_gives_the_live_hypotheses(trained_run, tmp_path):
    """The user's path: convert the run with the CLI, then recognize real audio with the file."""
    model_pt, out = tmp_path / "model.pt", tmp_path / "decode"
    cli = [sys.executable, "-m", "moe_asr.cli"]
    converted = subprocess.run([*cli, "convert", "ds-to-pt", str(trained_run), "-o", str(model_pt)],
                               capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr
    assert '"ep_size": 2' in converted.stdout and '"experts": 4' in converted.stdout
    recognized = subprocess.run([*cli, "recognize", "--model", str(model_pt), *map(str, WAVS), "--mode",
                                 ",".join(METHODS), "--beam-size", "3", "-o", str(out)],
                                capture_output=True, text=True, timeout=300)
    assert recognized.returncode == 0, recognized.stderr
    live = torch.load(trained_run / "live.pt", weights_only=False)
    loaded = load_model(model_pt)
    assert_same(live, snapshot(loaded.model, loaded.config))  # encoder outputs too
    for method in METHODS:
        lines = dict(line.split(" ", 1) if " " in line else (line, "")
                     for line in (out / method / "text").read_text().splitlines())
        expected = {key: loaded.tokenizer.decode(ids) for key, ids in live["speech"][method].items()}
        assert lines == expected, method


def test_convert_refuses_to_overwrite_its_input(tmp_path):
    from moe_asr.cli import main

    (tmp_path / "m.pt").write_bytes(b"x")
    assert main(["convert", "average", str(tmp_path / "m.pt"), "-o", str(tmp_path / "m.pt")]) == 2
    assert (tmp_path / "m.pt").read_bytes() == b"x"
    assert main(["convert", "ds-to-pt", str(tmp_path), "-o", str(tmp_path / "out.pt")]) == 1
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.slow
def test_bad_checkpoints_are_named(trained_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_model(tmp_path)
    tag = (trained_run / "checkpoints" / "latest").read_text().strip()
    broken = tmp_path / "run"
    shutil.copytree(trained_run, broken)
    tag_dir = broken / "checkpoints" / tag
    last = SMALL_MODEL["model.moe.num_experts"] - 1
    (tag_dir / f"layer_1_expert_{last}_mp_rank_00_model_states.pt").unlink()  # the highest id: seen from the config
    with pytest.raises(FileNotFoundError, match=rf"has no w1 for expert\(s\) \[{last}\]"):
        load_model(broken)
    (tag_dir / "layer_0_expert_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no w1 for expert\(s\) \[1\]"):
        load_model(broken)
    expert = tag_dir / "layer_0_expert_2_mp_rank_00_model_states.pt"
    expert.write_bytes(expert.read_bytes()[:100])
    with pytest.raises(ValueError, match="layer_0_expert_2_mp_rank_00_model_states.pt: cannot read"):
        load_model(broken)
    (broken / "checkpoints" / "latest").unlink()
    with pytest.raises(FileNotFoundError, match=rf"no latest file; pick a tag: \['{tag}'"):
        load_model(broken)
    (tag_dir / "manifest.json").unlink()  # what a save killed before its commit leaves
    with pytest.raises(FileNotFoundError, match="a partial checkpoint"):
        load_model(tag_dir)
    ms = read_model_state(trained_run)
    ms.config.model.encoder.num_blocks += 1
    with pytest.raises(ValueError, match=r"weights do not fit the model of its config: missing \['encoder.encoders.2"):
        load_model(save_model(tmp_path / "mismatch.pt", ms.state, ms.config, ms.tokenizer))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt: cannot read"):
        load_model(tmp_path / "junk.pt")
