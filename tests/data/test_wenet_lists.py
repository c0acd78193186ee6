"""WeNet's data lists as WeNet's own tools wrote them (tests/data/wenet_written/): read, trained on, decoded.

A WeNet user's raw ``data.list`` (JSON lines ``key``/``wav``/``txt``, optionally with
``start``/``end``) and its shard lists (tars of ``key.txt`` + ``key.wav``) go wherever a
shard list goes: ``data.train_shards``/``--train-shards``, ``train-tokenizer --shards``,
``compute-cmvn --shards`` and ``recognize --shards``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from moe_asr.data.audio import decode_audio
from moe_asr.data.loader import AsrDataLoader
from moe_asr.data.shards import read_shard, read_shard_list
from moe_asr.data.sources import AudioItem, ShardSource, Skip
from moe_asr.data.stats import DataStats
from moe_asr.data.tokenizer import Tokenizer

from .conftest import Corpus

REPO = Path(__file__).resolve().parents[2]
WRITTEN = Path(__file__).resolve().parent / "wenet_written"
TEXTS = {"spk1-0001": "HELLO WORLD", "spk1-0002": "GOOD MORNING", "spk2.take-0003": "SEE YOU SOON"}


def _samples(list_path: Path) -> dict:
    stats = DataStats()
    out = {s.key: s for entry in read_shard_list(list_path) for s in read_shard(entry, stats)}
    assert not stats.counts
    return out


def _pcm(path: Path) -> np.ndarray:
    return sf.read(path, dtype="int16")[0]


def test_raw_list_and_shards_hold_wenets_utterances_whole():
    raw, shards = _samples(WRITTEN / "data.list"), _samples(WRITTEN / "shards.list")
    assert {k: s.text for k, s in raw.items()} == {k: s.text for k, s in shards.items()} == TEXTS
    for key in TEXTS:  # the dotted key too: WeNet splits a member name at its last dot
        original = _pcm(WRITTEN / "wav" / f"{key}.wav")
        for sample in (raw[key], shards[key]):
            wave, sr = decode_audio(sample.audio)
            assert sr == 8000
            np.testing.assert_array_equal(np.round(wave * 32768).astype(np.int16), original)


def test_segmented_raw_list_reads_the_stretches():
    got = _samples(WRITTEN / "data.segments.list")
    for key, source, start, end in (("spk1-0001-a", "spk1-0001", 0.1, 0.5), ("spk1-0002-a", "spk1-0002", 0.2, 0.8)):
        wave, sr = decode_audio(got[key].audio)
        expected = _pcm(WRITTEN / "wav" / f"{source}.wav")[int(start * 8000):int(end * 8000)]
        np.testing.assert_array_equal(np.round(wave * 32768).astype(np.int16), expected)
    assert {k: s.text for k, s in got.items()} == {"spk1-0001-a": "HELLO", "spk1-0002-a": "MORNING"}


def test_relative_paths_are_found_from_the_working_directory_as_wenet_opens_them(tmp_path, monkeypatch):
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    for name in ("data.list", "shards.list"):
        shutil.copy(WRITTEN / name, elsewhere / name)
    monkeypatch.chdir(WRITTEN)  # WeNet's recipe root: where its relative paths start
    assert set(_samples(elsewhere / "data.list")) == set(_samples(elsewhere / "shards.list")) == set(TEXTS)


def test_a_line_that_is_not_wenets_is_an_error_naming_it(tmp_path):
    lines = (WRITTEN / "data.list").read_text().splitlines()
    (tmp_path / "data.list").write_text("\n".join([lines[0], '{"key": "x"}', *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"data\.list:2: not a WeNet data\.list line"):
        read_shard_list(tmp_path / "data.list")


def test_missing_audio_is_skipped_and_counted_keeping_its_reference(tmp_path):
    rows = [json.loads(x) for x in (WRITTEN / "data.list").read_text().splitlines()]
    rows.append({"key": "gone", "wav": str(tmp_path / "gone.wav"), "txt": "NOT HERE"})
    for row in rows[:3]:
        row["wav"] = str(WRITTEN / row["wav"])
    listed = tmp_path / "data.list"
    listed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = list(ShardSource(listed))
    assert sorted(i.key for i in items if isinstance(i, AudioItem)) == sorted(TEXTS)
    [skip] = [i for i in items if isinstance(i, Skip)]
    assert (skip.key, skip.reason, skip.text) == ("gone", "missing audio", "NOT HERE")
    assert str(tmp_path / "gone.wav") in skip.detail

    units = tmp_path / "units.txt"
    units.write_text("".join(f"{t} {i}\n" for i, t in enumerate(
        ["<blank>", "<unk>", "\u2581", *sorted({c for t in TEXTS.values() for c in t if c != " "}), "<sos/eos>"])))
    cfg = Corpus(listed, units, []).config(batching={"shuffle": False})
    loader = AsrDataLoader(listed, cfg, Tokenizer.from_config(cfg.tokenizer), rank=0, world_size=1)
    keys = [k for batch in loader for k in batch.keys]
    assert sorted(keys) == sorted(TEXTS) and loader.skipped == {"missing audio": 1}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.mark.slow
def test_wenet_lists_train_and_decode(tmp_path):
    """Tokenizer, CMVN and training on WeNet's raw data.list (CV on its shard list), then recognition of both."""
    moe_asr = [sys.executable, "-m", "moe_asr.cli"]
    raw, shards = str(WRITTEN / "data.list"), str(WRITTEN / "shards.list")
    _cli(*moe_asr, "train-tokenizer", "--shards", raw, "--type", "char", "--out", str(tmp_path / "lang"), cwd=tmp_path)
    _cli(*moe_asr, "compute-cmvn", "--shards", raw, "--out", str(tmp_path / "cmvn.json"), cwd=tmp_path)
    small = {"model.vocab_size": "auto", "model.encoder.output_size": 32, "model.encoder.attention_heads": 2,
             "model.encoder.linear_units": 48, "model.encoder.num_blocks": 2, "model.encoder.cnn_module_kernel": 5,
             "model.decoder.attention_heads": 2, "model.decoder.linear_units": 48,
             "data.num_workers": 0, "data.tokenizer.symbol_table": str(tmp_path / "lang" / "units.txt"),
             "model.cmvn": str(tmp_path / "cmvn.json"), "train.max_steps": 2, "train.warmup_steps": 1, "train.log_interval": 1}
    run = tmp_path / "run"
    _cli(sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "conf" / "tiny_dense.yaml"),
         "--deepspeed_config", str(REPO / "ds_configs" / "zero0_cpu.json"), "--train-shards", raw,
         "--cv-shards", shards, "--out-dir", str(run), *[a for k, v in small.items() for a in ("--set", f"{k}={v}")],
         cwd=tmp_path)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps and max(steps) == 2
    for name, listed in (("raw", raw), ("shards", shards)):
        out = tmp_path / f"decode_{name}"
        _cli(*moe_asr, "recognize", "--model", str(run), "--shards", listed, "--mode", "ctc_greedy_search",
             "-o", str(out), cwd=tmp_path)
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["utterances"], summary["skipped"]) == (3, 0)
        refs = dict(line.split(" ", 1) for line in (out / "ref.text").read_text().splitlines())
        assert refs == TEXTS
        assert len((out / "ctc_greedy_search" / "text").read_text().splitlines()) <= 3
