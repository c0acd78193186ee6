"""A run never resumes into a state that cannot be right: fingerprints, integrity, partial saves, out-dir safety.

Each case starts from a real 2-rank run (checkpoints every step) copied into
the test's own folder, changes one thing the way a user or a crash would, and
starts training again. What must happen: refused with a one-line message
naming the values and the way out, or resumed from the right checkpoint and
said so; never a silent restart, a crash deep in DeepSpeed, or a touched
train.yaml / metrics.jsonl on a refused start.
"""
from __future__ import annotations

import shutil

import pytest

from tests.engine.conftest import REPO, SMALL_MODEL, data_overrides, read_metrics, run_training, train_cmd

STEPS = 3


def _overrides(corpus, ep_size: int = 2, max_steps: int = STEPS, **extra) -> dict:
    return {**SMALL_MODEL, **data_overrides(corpus), "parallel.ep_size": ep_size, "train.max_steps": max_steps,
            "train.log_interval": 1, "train.warmup_steps": 2, "train.checkpoint_interval": 1, **extra}


def _cmd(corpus, out, stage: int, port: int, **kw):
    return train_cmd(corpus, out, str(REPO / f"ds_configs/zero{stage}_cpu.json"), _overrides(corpus, **kw), port)


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("safe_resume")
    for stage in (0, 1, 2):
        run_training(_cmd(small_corpus, root / f"z{stage}", stage, 29711 + stage))
    return root


def _copy(runs, stage: int, tmp_path):
    out = tmp_path / f"z{stage}"
    shutil.copytree(runs / f"z{stage}", out)
    return out


def _refused(cmd, *needles: str) -> str:
    """Run ``cmd``; it must fail with one line holding every needle, on every rank, without a traceback."""
    result = run_training(cmd, check=False)
    assert result.returncode != 0, result.stdout[-3000:]
    lines = [line for line in result.stderr.splitlines() if all(n in line for n in needles)]
    assert lines and result.stderr.count(needles[0]) == 2, result.stderr[-4000:]  # both ranks said it
    # One traceback is torchrun's own report of the failed ranks; a rank's would make two.
    assert result.stderr.count("Traceback (most recent call last)") <= 1, result.stderr[-4000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_ep_size_change_is_refused_with_the_conversion(runs, small_corpus, tmp_path, stage):
    out = _copy(runs, stage, tmp_path)
    before = (out / "train.yaml").read_bytes(), (out / "metrics.jsonl").read_bytes()
    line = _refused(_cmd(small_corpus, out, stage, 29721 + stage, ep_size=1, max_steps=STEPS + 2),
                    "resume refused", "ep_size 2 -> 1", "moe-asr convert ds-to-pt", "--init-from")
    assert "zero_stage" not in line  # only what changed is named
    assert ((out / "train.yaml").read_bytes(), (out / "metrics.jsonl").read_bytes()) == before


@pytest.mark.slow
def test_swapped_symbol_ids_are_refused(runs, small_corpus, tmp_path):
    out = _copy(runs, 2, tmp_path)
    units = small_corpus.units.read_text().splitlines()
    a, b = units[3].split(), units[4].split()
    units[3], units[4] = f"{a[0]} {b[1]}", f"{b[0]} {a[1]}"  # same size, two ids swapped
    swapped = tmp_path / "units.txt"
    swapped.write_text("\n".join(units) + "\n")
    cmd = _cmd(small_corpus, out, 2, 29731, max_steps=STEPS + 2) + ["--set", f"data.tokenizer.symbol_table={swapped}"]
    _refused(cmd, "resume refused", "another model or vocabulary", "symbol_table_sha256")


@pytest.mark.slow
def test_changed_model_is_refused_and_train_yaml_kept(runs, small_corpus, tmp_path):
    out = _copy(runs, 2, tmp_path)
    before = (out / "train.yaml").read_bytes()
    cmd = _cmd(small_corpus, out, 2, 29732, max_steps=STEPS + 2) + ["--set", "model.encoder.num_blocks=3"]
    _refused(cmd, "resume refused", "model.encoder.num_blocks 2 -> 3", "--overwrite")
    assert (out / "train.yaml").read_bytes() == before


@pytest.mark.slow
def test_a_damaged_expert_file_is_named_on_every_rank(runs, small_corpus, tmp_path):
    out = _copy(runs, 2, tmp_path)
    expert = out / "checkpoints" / f"step_{STEPS}" / "layer_1_expert_2_mp_rank_00_model_states.pt"
    expert.write_bytes(expert.read_bytes()[:-100])
    result = run_training(_cmd(small_corpus, out, 2, 29733, max_steps=STEPS + 2), check=False)
    assert result.returncode != 0
    message = "checkpoint error: checkpoint "
    assert result.stderr.count(message) == 2, result.stderr[-4000:]  # both ranks stop with the same message
    assert "layer_1_expert_2_mp_rank_00_model_states.pt has" in result.stderr
    assert "resumed" not in result.stdout


@pytest.mark.slow
def test_a_partial_checkpoint_is_never_a_resume_point(runs, small_corpus, tmp_path):
    out = _copy(runs, 2, tmp_path)
    ckpts = out / "checkpoints"
    shutil.copytree(ckpts / f"step_{STEPS}", ckpts / "step_9")
    (ckpts / "step_9" / "manifest.json").unlink()  # what a save killed before its commit leaves
    _refused(_cmd(small_corpus, out, 2, 29734, max_steps=STEPS + 2) + ["--resume", "step_9"],
             "checkpoint error", "step_9 is a partial checkpoint", f"step_{STEPS}")
    (ckpts / "latest").write_text("step_9")
    result = run_training(_cmd(small_corpus, out, 2, 29735, max_steps=STEPS + 1))
    assert f"resuming the newest complete checkpoint listed in checkpoints.json: step_{STEPS}" in result.stdout
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, STEPS + 2))


@pytest.mark.slow
@pytest.mark.parametrize("flag", [["--resume"], []])
def test_without_latest_the_newest_complete_checkpoint_resumes(runs, small_corpus, tmp_path, flag):
    out = _copy(runs, 2, tmp_path)
    (out / "checkpoints" / "latest").unlink()
    result = run_training(_cmd(small_corpus, out, 2, 29736 + len(flag), max_steps=STEPS + 1) + flag)
    assert "no latest file; resuming the newest complete checkpoint" in result.stdout
    assert f"resumed from step_{STEPS}" in result.stdout
    records = read_metrics(out)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 2)), "no restart at step 0"


@pytest.mark.slow
def test_a_run_without_checkpoints_needs_overwrite(runs, small_corpus, tmp_path):
    out = _copy(runs, 2, tmp_path)
    shutil.rmtree(out / "checkpoints")
    before = (out / "metrics.jsonl").read_bytes()
    _refused(_cmd(small_corpus, out, 2, 29738), "resume refused", "no complete checkpoint", "--overwrite")
    assert (out / "metrics.jsonl").read_bytes() == before
    run_training(_cmd(small_corpus, out, 2, 29739, max_steps=1) + ["--overwrite"])
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1]
