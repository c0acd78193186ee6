"""The data preparation scripts on tiny LibriSpeech- and Kaldi-layout trees made from FSDD audio.

examples/librispeech/local/prepare.py is the LibriSpeech recipe's stage 0; examples/data_prep/kaldi.py
turns a Kaldi data directory into a manifest. tests/examples/test_corpus_recipes.py runs the recipes
themselves on espeak-ng trees; these need nothing but the shipped recordings.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import soundfile as sf

from moe_asr.cli import main as cli
from moe_asr.data.kaldi_text import read_table
from moe_asr.data.manifest import read_manifest
from moe_asr.data.shards import read_shard, read_shard_list
from moe_asr.data.stats import DataStats

from .conftest import fsdd_files, transcript

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LIBRISPEECH_SUBSETS = ("train-clean-100", "dev-clean", "dev-other", "test-clean", "test-other")


def _script(path: Path):
    spec = importlib.util.spec_from_file_location(f"data_prep_{path.parent.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shard_texts(out: Path) -> dict[str, str]:
    return {s.key: s.text for shard in read_shard_list(out / "shards.list") for s in read_shard(shard, DataStats())}


def test_librispeech_layout_to_shards(tmp_path):
    root = tmp_path / "LibriSpeech"
    expected: dict[str, dict[str, str]] = {"train": {}, "dev": {}, "test_clean": {}, "test_other": {}}
    for i, f in enumerate(fsdd_files(10)):
        subset = LIBRISPEECH_SUBSETS[0] if i < 6 else LIBRISPEECH_SUBSETS[i - 5]
        spk, chapter = 100 + i % 2, 7 + i
        folder = root / subset / str(spk) / str(chapter)
        folder.mkdir(parents=True, exist_ok=True)
        key = f"{spk}-{chapter}-{i:04d}"
        wave, sr = sf.read(f, dtype="float32")
        sf.write(folder / f"{key}.flac", wave, sr)
        with open(folder / f"{spk}-{chapter}.trans.txt", "a") as t:
            t.write(f"{key} {transcript(f).upper()}\n")
        set_name = {"train-clean-100": "train", "dev-clean": "dev", "dev-other": "dev"}.get(subset, subset.replace("-", "_"))
        expected[set_name][key] = transcript(f).upper()
    with open(root / "train-clean-100" / "100" / "7" / "100-7.trans.txt", "a") as t:
        t.write("100-7-9999 NO AUDIO HERE\n")
    data = tmp_path / "data"
    assert _script(EXAMPLES / "librispeech" / "local" / "prepare.py").main(
        ["--corpus", str(root), "--train", "train-clean-100", "--out", str(data)]) == 0
    for set_name, texts in expected.items():
        assert read_table(data / set_name / "text") == texts
    assert (data / "skipped.tsv").read_text().split("\t")[:2] == ["100-7-9999", "missing audio"]
    assert cli(["make-shards", "--data-dir", str(data / "train"), "--out", str(tmp_path / "s"), "--per-shard", "4"]) == 0
    assert _shard_texts(tmp_path / "s") == expected["train"]


def test_kaldi_layout_to_manifest(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    files = fsdd_files(4)
    (data / "wav.scp").write_text("".join(f"{f.stem} {f}\n" for f in files))
    (data / "text").write_text("".join(f"{f.stem} {transcript(f)}\n" for f in files[:3]))
    (data / "segments").write_text("".join(f"{f.stem}-s {f.stem} 0.00 0.20\n" for f in files)
                                   .replace(f"{files[0].stem}-s", files[0].stem))
    (data / "text").write_text(f"{files[0].stem} {transcript(files[0])}\n"
                               + "".join(f"{f.stem}-s {transcript(f)}\n" for f in files[1:3]))
    manifest = tmp_path / "m.tsv"
    assert _script(EXAMPLES / "data_prep" / "kaldi.py").main([str(data), "--out", str(manifest)]) == 0
    utts, _ = read_manifest(manifest)
    assert [u.key for u in utts] == [files[0].stem, f"{files[1].stem}-s", f"{files[2].stem}-s"]
    assert all(u.offset == 0.0 and u.duration == 0.2 for u in utts)
    assert cli(["make-shards", "--manifest", str(manifest), "--out", str(tmp_path / "s")]) == 0
    shards = read_shard_list(tmp_path / "s" / "shards.list")
    lengths = {s.key: len(np.frombuffer(s.audio[44:], "<i2")) for s in read_shard(shards[0], DataStats())}
    assert set(lengths.values()) == {1600}  # 0.2 s at 8 kHz
