"""Loading never runs code from a file: every entry point that reads a model, checkpoint or state refuses a planted pickle.

A planted object unpickles to a call that creates a marker file (``os.system``
or ``builtins.exec``); a full unpickle of it does create the marker, so the
payload is live. Handed to the Python API, to every ``moe-asr`` command that
loads a model (in process) and to ``launch/train.py`` (``--init-from``, and a
resume whose checkpoint holds it in DeepSpeed's files or ours), the marker
never appears and one line names the file and what it calls for. What our
training writes still loads: ZeRO 0 fp32 and ZeRO 1/2 bf16 runs are resumed
and converted here (ZeRO 1/2 fp32 in test_resume, test_safe_resume and
test_new_scale), and fp16's loss scaler, which DeepSpeed will not train on CPU,
is loaded from its own class.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from moe_asr.checkpoint import FORMAT, load_model, read_model_state
from moe_asr.cli import main
from moe_asr.run.files import SAFE_GLOBALS, CheckpointFileError, load_file
from tests.engine.conftest import REPO, SMALL_MODEL, data_overrides, read_metrics, run_training, train_cmd

PAYLOADS = {"os.system": f"{os.system.__module__}.system", "exec": "builtins.exec"}


class Planted:
    """Unpickles to a call that creates ``marker``."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {shlex.quote(str(self.marker))}",)
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant(path: Path, marker: Path, how: str = "os.system", fmt: str = "zip") -> Path:
    """A file at ``path`` that looks like a model file and runs the payload when fully unpickled."""
    blob = {"format": FORMAT, "model": {}, "extra": Planted(marker, how)}
    if fmt == "pickle":  # no torch.save at all
        path.write_bytes(pickle.dumps(blob, protocol=2))
    else:
        torch.save(blob, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


def assert_refused(output: str, path: Path, marker: Path, how: str = "os.system") -> None:
    """Nothing ran, and ``output`` has one line (no traceback) naming the file and the global it calls for."""
    assert not marker.exists(), "the planted code ran"
    lines = [line for line in output.splitlines() if f"{path}: refused" in line]
    assert len(lines) == 1 and PAYLOADS[how] in lines[0] and "Traceback" not in output, output[-3000:]


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("how", PAYLOADS)
def test_the_payload_runs_when_fully_unpickled_and_not_when_loaded(tmp_path, how, fmt):
    marker = tmp_path / "ran"
    evil = plant(tmp_path / "evil.pt", marker, how, fmt)
    for load in (load_model, read_model_state, load_file):
        with pytest.raises(CheckpointFileError) as e:
            load(evil)
        assert "\n" not in str(e.value)
        assert_refused(str(e.value), evil, marker, how)
    with contextlib.suppress(Exception):  # a bare pickle runs before torch finds it is no torch file
        torch.load(evil, weights_only=False)
    assert marker.exists(), "the payload is live: a full unpickle runs it"


def test_a_pickle_beyond_the_unpicklers_protocol_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Planted(marker, "os.system"), protocol=5))
    with pytest.raises(CheckpointFileError, match=rf"^{re.escape(str(evil))}: cannot read this checkpoint file \("):
        load_model(evil)
    assert not marker.exists()
    pickle.loads(evil.read_bytes())
    assert marker.exists(), "the payload is live"


def test_fp16_loss_scaler_is_allowed(tmp_path):
    """DeepSpeed's fp16 ZeRO optimizer stores its DynamicLossScaler (fp16 does not run on CPU to write one)."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    scaler = CreateLossScaler(torch.float16, static_loss_scale=0, dynamic_scaling=True,
                              dynamic_loss_args={"init_scale": 2.0**16, "scale_window": 500, "min_scale": 1.0,
                                                 "delayed_shift": 2, "consecutive_hysteresis": False})
    torch.save({"loss_scaler": scaler}, tmp_path / "optim.pt")
    names = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "optim.pt")
    assert names == ["deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"] and names[0] in SAFE_GLOBALS
    loaded = load_file(tmp_path / "optim.pt")["loss_scaler"]
    assert type(loaded) is type(scaler) and vars(loaded) == vars(scaler)


def _overrides(corpus, max_steps: int, ep_size: int = 1) -> dict:
    return {**SMALL_MODEL, **data_overrides(corpus), "parallel.ep_size": ep_size, "train.max_steps": max_steps,
            "train.log_interval": 1, "train.warmup_steps": 1, "train.checkpoint_interval": 1}


@pytest.fixture(scope="module")
def run(small_corpus, tmp_path_factory) -> Path:
    """One rank, ZeRO 1 (optimizer files with DeepSpeed's objects), one step checkpointed."""
    out = tmp_path_factory.mktemp("safe_load") / "run"
    run_training(train_cmd(small_corpus, out, str(REPO / "ds_configs/zero1_cpu.json"), _overrides(small_corpus, 1),
                           0, launcher="python"))
    return out


# Which file of a checkpoint is planted: DeepSpeed reads the first three, we read the trainer state.
TAG_FILES = ["mp_rank_00_model_states.pt", "layer_1_expert_2_mp_rank_00_model_states.pt",
             "zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_state_rank_0.pt"]


def _planted_run(run: Path, tmp_path: Path, name: str, marker: Path) -> tuple[Path, Path]:
    """A copy of ``run`` whose checkpoint has ``name`` planted, listed in its manifest as if training wrote it."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    tag_dir = copy / "checkpoints" / (copy / "checkpoints" / "latest").read_text().strip()
    evil = plant(tag_dir / name, marker)
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    manifest[name] = {"size": evil.stat().st_size, "sha256": hashlib.sha256(evil.read_bytes()).hexdigest()}
    (tag_dir / "manifest.json").write_text(json.dumps(manifest))
    return copy, evil


@pytest.mark.parametrize("command", ["recognize", "export", "bench-rtf", "convert average", "convert upcycle"])
def test_model_commands_refuse_a_planted_file(tmp_path, capsys, command):
    marker, wav = tmp_path / "ran", tmp_path / "a.wav"
    evil = plant(tmp_path / "evil.pt", marker)
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000)
    out = str(tmp_path / "out")
    argv = {"recognize": ["recognize", "--model", str(evil), str(wav), "-o", out],
            "export": ["export", "--model", str(evil), "-o", out],
            "bench-rtf": ["bench-rtf", str(evil)],
            "convert average": ["convert", "average", str(evil), "-o", out],
            "convert upcycle": ["convert", "upcycle", str(evil), "--config", str(REPO / "conf/tiny_moe.yaml"),
                                "-o", out]}[command]
    assert main(argv) == 1
    assert_refused(capsys.readouterr().err, evil, marker)


@pytest.mark.slow
@pytest.mark.parametrize("name", TAG_FILES)
def test_ds_to_pt_refuses_a_planted_checkpoint_file(run, tmp_path, capsys, name):
    marker = tmp_path / "ran"
    copy, evil = _planted_run(run, tmp_path, name, marker)
    assert main(["convert", "ds-to-pt", str(copy), "--with-optimizer", "-o", str(tmp_path / "out.pt")]) == 1
    assert_refused(capsys.readouterr().err, evil, marker)


def _refused_by_training(cmd: list[str], evil: Path, marker: Path) -> None:
    result = run_training(cmd, check=False)
    assert result.returncode != 0, result.stdout[-3000:]
    assert_refused(result.stderr, evil, marker)
    assert f"checkpoint error: {evil}: refused" in result.stderr


@pytest.mark.slow
def test_init_from_refuses_a_planted_file(small_corpus, tmp_path):
    marker = tmp_path / "ran"
    evil = plant(tmp_path / "evil.pt", marker)
    cmd = train_cmd(small_corpus, tmp_path / "new", str(REPO / "ds_configs/zero1_cpu.json"),
                    _overrides(small_corpus, 2), 0, launcher="python")
    _refused_by_training(cmd + ["--init-from", str(evil), "--fresh-optimizer"], evil, marker)


@pytest.mark.slow
@pytest.mark.parametrize("name", TAG_FILES)
def test_resume_refuses_a_planted_checkpoint_file(run, small_corpus, tmp_path, name):
    marker = tmp_path / "ran"
    copy, evil = _planted_run(run, tmp_path, name, marker)
    cmd = train_cmd(small_corpus, copy, str(REPO / "ds_configs/zero1_cpu.json"), _overrides(small_corpus, 2), 0,
                    launcher="python")
    _refused_by_training(cmd, evil, marker)


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero0_cpu", "zero1_bf16", "zero2_bf16"])
def test_checkpoints_resume_and_convert(small_corpus, tmp_path, capsys, ds_config):
    """ZeRO 1/2 fp32 resume in test_resume and test_safe_resume; here ZeRO 0 and bf16 (its optimizer files hold
    DeepSpeed's loss scaler, ZeRO stage and slice records), resumed by DeepSpeed and converted by us."""
    out = tmp_path / "run"
    port = 29861 + 2 * ["zero0_cpu", "zero1_bf16", "zero2_bf16"].index(ds_config)
    cmd = [train_cmd(small_corpus, out, str(REPO / f"ds_configs/{ds_config}.json"), _overrides(small_corpus, n, 2),
                     port + i) for i, n in enumerate((1, 2))]
    run_training(cmd[0])
    tag_dir = out / "checkpoints" / "step_1"
    named = {n for f in tag_dir.glob("*.pt") for n in torch.serialization.get_unsafe_globals_in_checkpoint(f)}
    assert named <= SAFE_GLOBALS.keys(), named
    assert any(n.startswith("deepspeed.") for n in named) == ds_config.endswith("bf16"), named
    assert "resumed from step_1" in run_training(cmd[1]).stdout
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
    assert main(["convert", "ds-to-pt", str(tag_dir), "--with-optimizer", "-o", str(tmp_path / "state.pt")]) == 0
    summary = json.loads(capsys.readouterr().out)
    stage, precision = int(ds_config[4]), ds_config.split("_")[1].replace("cpu", "fp32")
    assert (summary["precision"], summary["zero_stage"], summary["step"]) == (precision, stage, 1)
    assert read_model_state(tmp_path / "state.pt").extra["training_state"]["layout"]["zero_stage"] == stage
