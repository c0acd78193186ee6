"""The LibriSpeech and AISHELL-1 recipes (examples/{librispeech,aishell}/run.sh) without the corpora.

Miniature trees of both corpora (tests/examples/mini_corpora.py: espeak-ng speech, the real
layout and transcript formats, bad entries included) go through every stage with `run.sh
--small`: data preparation, shards, units, CMVN, training on 2 CPU ranks with the experts split
over them, averaging, recognition in four modes at full context and streaming chunk 16, scoring
and the results table. What is checked is that each stage wrote what the next one and the user
read and that the bad entries were counted; the error rates of so small a run say nothing.
Every recipe README's command blocks are what `run.sh --dry-run` prints for the same options.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_asr.checkpoint import load_model
from moe_asr.run.config import load_config
from tests.examples import mini_corpora
from tests.helpers import require

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
METHODS = ("ctc_greedy_search", "ctc_prefix_beam_search", "attention", "attention_rescoring")
PORTS = {"librispeech": "29791", "aishell": "29792"}  # the digits recipe's test uses 29790
# A README block of commands follows the comment that names the options run.sh was given.
BLOCK = re.compile(r"<!-- commands: run\.sh (?P<args>[^>]*?) -->\s*```bash\n(?P<body>.*?)```", re.S)


def _espeak() -> None:
    require(shutil.which("espeak-ng") is not None,
            "espeak-ng (make test installs it as root: examples/digits/local/install_tts.sh)")


def _bash(recipe: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "VENV_BIN": str(Path(sys.executable).parent), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", str(EXAMPLES / recipe / "run.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _commands(text: str) -> list[str]:
    """Command lines with continuations joined and spacing collapsed, comments kept (they name the stages)."""
    joined = re.sub(r"\\\n", " ", text)
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


@pytest.mark.parametrize("recipe", ["librispeech", "aishell", "digits"])
def test_readme_commands_are_what_run_sh_runs(recipe):
    blocks = list(BLOCK.finditer((EXAMPLES / recipe / "README.md").read_text()))
    assert blocks, f"examples/{recipe}/README.md has no `<!-- commands: run.sh ... -->` block"
    for block in blocks:
        done = _bash(recipe, *block["args"].split())
        assert done.returncode == 0, done.stderr
        assert _commands(block["body"]) == _commands(done.stdout), f"run.sh {block['args']}"


def test_dry_run_reads_wenets_lists_in_place_of_preparation_and_shards():
    out = _bash("librispeech", "--wenet-data", "/w/data", "--dry-run").stdout
    assert "# stage 0" not in out and "# stage 1" not in out
    assert "--text /w/data/train_960/text" in out and "--shards /w/data/train_960/data.list" in out
    assert "--train-shards /w/data/train_960/data.list --cv-shards /w/data/dev/data.list" in out
    assert "--shards /w/data/test_other/data.list" in out


def test_an_unknown_option_or_no_corpus_is_refused():
    done = _bash("aishell", "--corpus", "x", "--bogus", "1")
    assert done.returncode == 2 and "unknown option --bogus" in done.stderr
    done = _bash("aishell", "--dry-run")
    assert done.returncode == 2 and "--corpus" in done.stderr


@pytest.mark.parametrize("recipe", ["librispeech", "aishell"])
def test_configs_are_twins_and_the_papers_shapes(recipe):
    conf = EXAMPLES / recipe / "conf"
    dense, moe = load_config(conf / "u2pp_conformer.yaml"), load_config(conf / "u2pp_conformer_moe.yaml")
    assert (dense.model.moe.num_experts, moe.model.moe.num_experts, moe.model.moe.top_k) == (1, 8, 2)
    assert dataclasses.replace(moe.model, moe=dense.model.moe) == dense.model
    assert (moe.data, moe.train) == (dense.data, dense.train)
    assert moe.parallel.ep_size == 8
    for name in ("paper_dense_225m", "paper_moe_1b"):
        ours, paper = load_config(conf / f"{name}.yaml"), load_config(REPO / "conf" / f"{name}.yaml")
        assert ours.model.vocab_size == "auto"
        assert dataclasses.replace(ours.model, vocab_size=paper.model.vocab_size) == paper.model
        assert (ours.data, ours.train) == (dense.data, dense.train)


def test_librispeech_preparation_counts_every_bad_entry(tmp_path):
    _espeak()
    tree = mini_corpora.librispeech(tmp_path)
    done = subprocess.run([sys.executable, str(EXAMPLES / "librispeech" / "local" / "prepare.py"), "--corpus",
                           str(tree["corpus"]), "--out", str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for set_name, n in tree["utterances"].items():
        text = (tmp_path / "data" / set_name / "text").read_text().splitlines()
        assert len(text) == len((tmp_path / "data" / set_name / "wav.scp").read_text().splitlines()) == n
    assert "1006-135212-0000 THE DOCTOR'S HOUSE STOOD AT THE END OF THE ROAD" in \
        (tmp_path / "data" / "train" / "text").read_text()
    skipped = [line.split("\t")[:2] for line in (tmp_path / "data" / "skipped.tsv").read_text().splitlines()]
    assert sorted(skipped) == [["103-1240-0002", "missing audio"], ["103-1240.trans.txt:5", "malformed line"]]
    assert "skipped       1 missing audio (103-1240-0002)" in done.stdout

    shutil.rmtree(tree["corpus"] / "test-other")
    done = subprocess.run([sys.executable, str(EXAMPLES / "librispeech" / "local" / "prepare.py"), "--corpus",
                           str(tree["corpus"]), "--out", str(tmp_path / "again")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and f"{tree['corpus'] / 'test-other'}: no such subset folder" in done.stderr


def test_aishell_preparation_joins_the_words_and_counts_every_bad_entry(tmp_path):
    _espeak()
    tree = mini_corpora.aishell(tmp_path)
    done = subprocess.run([sys.executable, str(EXAMPLES / "aishell" / "local" / "prepare.py"), "--corpus",
                           str(tree["corpus"]), "--out", str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for set_name, n in tree["utterances"].items():
        assert len((tmp_path / "data" / set_name / "text").read_text().splitlines()) == n
    assert "BAC009S0002W0121 今天天气很好\n" in (tmp_path / "data" / "train" / "text").read_text(encoding="utf-8")
    skipped = [line.split("\t")[:2] for line in (tmp_path / "data" / "skipped.tsv").read_text().splitlines()]
    assert sorted(skipped) == [["BAC009S0002W0199", "missing audio"], ["BAC009S0003W0130", "missing transcript"]]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["librispeech", "aishell"])
def test_small_recipe_runs_every_stage(recipe, tmp_path):
    _espeak()
    tree = getattr(mini_corpora, recipe)(tmp_path / "corpus")
    data, exp = tmp_path / "data", tmp_path / "exp"
    done = _bash(recipe, "--small", "--corpus", str(tree["corpus"]), "--data", str(data), "--exp", str(exp),
                 "--port", PORTS[recipe], timeout=600)
    assert done.returncode == 0, f"run.sh failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    out = done.stdout

    # Stage 0 said what it skipped; every later stage found what the one before wrote.
    for reason, n in tree["skipped"].items():
        assert re.search(rf"skipped\s+{n} {reason} \(", out), reason
    for set_name in tree["utterances"]:
        assert (data / "shards" / set_name / "shards.list").is_file()
    assert json.loads((data / "cmvn.json").read_text())["frame_num"] > 0
    trained = load_model(exp / "avg2.pt")
    assert trained.config.parallel.ep_size == 2 and trained.config.model.moe.num_experts == 4
    assert trained.config.model.vocab_size == trained.tokenizer.vocab_size
    tag = (exp / "checkpoints" / "latest").read_text().strip()
    assert {p.name for p in (exp / "checkpoints" / tag).glob("trainer_state_rank_*.pt")} == \
        {"trainer_state_rank_0.pt", "trainer_state_rank_1.pt"}

    metric = "cer" if recipe == "aishell" else "wer"
    results = json.loads((exp / "results.json").read_text())
    tests = {"librispeech": ("test_clean", "test_other"), "aishell": ("test",)}[recipe]
    assert results["metric"] == metric and set(results["tests"]) == set(tests)
    for test in tests:
        assert set(results["tests"][test]) == {*METHODS, *(f"{m}_chunk16" for m in METHODS)}
        assert all(row[metric] >= 0 and row["rtf"] > 0 for row in results["tests"][test].values())
        refs = (exp / "decode" / test / "16" / "ref.text").read_text(encoding="utf-8").splitlines()
        assert len(refs) == tree["utterances"][test]
        assert (exp / "decode" / test / "16" / "attention_rescoring_chunk16_streaming" / f"{metric}.json").is_file()
    if recipe == "aishell":  # units are characters, references without the transcript's word spaces
        assert all(" " not in line.split(" ", 1)[1] for line in refs)
        assert trained.config.data.tokenizer.type == "char"
    else:
        assert trained.config.data.tokenizer.type == "unigram" and trained.tokenizer.sp_model
    assert f"{metric.upper()} % / RTF" in out and "attention_rescoring_chunk16" in out and "results: " in out
