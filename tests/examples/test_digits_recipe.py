"""The digits recipe end to end on a few dozen utterances: every stage leaves its outputs.

This is `make demo`'s own script (examples/digits/run.sh --small): corpus, shards,
tokenizer, CMVN, 2-rank DeepSpeed training with the experts split over the ranks,
averaging, recognition in every mode and scoring. The WER of so small a run says
nothing, so it is not checked; what is checked is that each stage wrote what the
next one and the user read, that the vocabulary came from the symbol table, and
that a second run skips every finished stage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_asr.checkpoint import load_model
from tests.helpers import require

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "digits"
SETS = ("test_synth", "test_fsdd")
PORT = "29790"  # the ranks' rendezvous; other multi-rank tests use 29611-29756
METHODS = ("ctc_greedy_search", "ctc_prefix_beam_search", "attention_rescoring")


@pytest.fixture(autouse=True, scope="module")
def _synthesizers() -> None:
    require(all(shutil.which(t) for t in ("espeak-ng", "flite", "festival")),
            "espeak-ng, flite or festival (make test installs them as root: examples/digits/local/install_tts.sh)")


def _run(args: list[str], timeout: float) -> str:
    env = {**os.environ, "VENV_BIN": str(Path(sys.executable).parent), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(["bash", str(RECIPE / "run.sh"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"run.sh failed ({done.returncode}):\n{done.stdout[-5000:]}\n{done.stderr[-5000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("digits")
    data, exp = root / "data", root / "exp"
    return data, exp, _run(["--small", "--data", str(data), "--exp", str(exp), "--port", PORT], timeout=1200)


def test_every_stage_leaves_its_outputs(recipe):
    data, exp, out = recipe
    for split in ("train", "cv", *SETS):
        assert (data / f"{split}.tsv").read_text().count("\n") > 0
        assert (data / "shards" / split / "shards.list").is_file()
    corpus = json.loads((data / "corpus.json").read_text())
    assert corpus["sample_rate"] == 8000 and min(corpus["utterances"].values()) > 0
    units = (data / "lang" / "units.txt").read_text().split("\n")
    words = {line.split()[0] for line in units if line}
    assert {"<blank>", "<unk>", "<sos/eos>"} <= words and not {"▁", "z"} & words  # words, not letters
    assert set(json.loads((data / "cmvn.json").read_text())) >= {"mean_stat", "var_stat", "frame_num"}

    # The run recorded the symbol table's size as its vocabulary (the config says `auto`).
    trained = load_model(exp / "avg2.pt")
    assert trained.config.model.vocab_size == trained.tokenizer.vocab_size == len(words)
    assert trained.config.model.moe.num_experts == 8 and trained.config.parallel.ep_size == 2
    assert len(json.loads((exp / "checkpoints" / "checkpoints.json").read_text())) >= 2
    assert (exp / "loss_curves.png").stat().st_size > 0 and (exp / "expert_load.png").stat().st_size > 0

    results = json.loads((exp / "results.json").read_text())
    assert results["total_params"] > results["active_params"] > 0
    modes = {*METHODS, *(f"{m}_chunk{c}" for m in METHODS for c in (16, 8))}
    for test in SETS:
        assert set(results["tests"][test]) == modes
        for row in results["tests"][test].values():
            assert 0 <= row["wer"] and row["rtf"] > 0
        refs = (exp / "decode" / test / "full" / "ref.text").read_text().splitlines()
        assert len(refs) == corpus["utterances"][test]
        for chunk, suffix in (("full", ""), ("16", "_chunk16_streaming"), ("8", "_chunk8_streaming")):
            for m in METHODS:
                assert len((exp / "decode" / test / chunk / f"{m}{suffix}" / "text").read_text().splitlines()) \
                    == len(refs)
    assert set(results["by_voice"]["test_fsdd"]["wer"]) == {"george", "yweweler"}
    assert {"flite slt", "flite rms"} <= set(results["by_voice"]["test_synth"]["wer"])
    assert "results: " in out and "expert load: " in out and "by voice (attention_rescoring" in out


def test_a_second_run_skips_finished_stages(recipe):
    data, exp, _ = recipe
    before = (exp / "results.json").stat().st_mtime_ns
    out = _run(["--small", "--data", str(data), "--exp", str(exp), "--port", PORT], timeout=300)
    assert "=== stage" not in out  # nothing redone
    assert "attention_rescoring_chunk16" in out  # the table is printed again
    assert (exp / "results.json").stat().st_mtime_ns >= before


def _corpus_digest(out: Path) -> str:
    subprocess.run([sys.executable, str(RECIPE / "local" / "make_corpus.py"), "--fsdd",
                    str(REPO / "../shared/data/fsdd/recordings"), "--out", str(out), "--synth-train", "6",
                    "--synth-cv", "2", "--synth-test", "4", "--synth-accented", "3", "--fsdd-strings", "2",
                    "--fsdd-per-digit", "2"],
                   check=True, capture_output=True, timeout=300)
    digest = hashlib.sha256()
    for path in sorted((out / "wav").iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    for split in ("train", "cv", *SETS):
        digest.update((out / f"{split}.tsv").read_text().replace(str(out), "").encode())
    return digest.hexdigest()


def test_corpus_is_deterministic_for_a_seed(tmp_path):
    assert _corpus_digest(tmp_path / "a") == _corpus_digest(tmp_path / "b")
