"""make-shards round trips: Kaldi dirs and manifests with mixed rates, stereo, bad files; robust reading."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from moe_asr.cli import main as cli
from moe_asr.data.audio import decode_audio, probe_audio
from moe_asr.data.shards import read_shard, read_shard_list
from moe_asr.data.stats import DataStats

from .conftest import fsdd_files, transcript

PCM16 = 1.5 / 32768  # tolerance of one 16-bit quantisation step


def _read_all(shard_list: Path) -> tuple[dict, DataStats]:
    stats = DataStats()
    samples = {}
    for shard in read_shard_list(shard_list):
        for s in read_shard(shard, stats):
            assert s.key not in samples, f"duplicate key {s.key} across shards"
            samples[s.key] = s
    return samples, stats


def _mixed_audio(tmp: Path) -> tuple[dict[str, tuple[Path, str, np.ndarray, int]], dict[str, Path]]:
    """Good files (8 kHz, 16 kHz, 22.05 kHz stereo) with their expected mono audio, plus bad files."""
    good = {}
    files = fsdd_files(6)
    for f in files[:3]:  # as shipped: 8 kHz mono
        w, sr = sf.read(f, dtype="float32")
        good[f.stem] = (f, transcript(f), w, sr)
    w, _ = sf.read(files[3], dtype="float32")
    up = torchaudio.functional.resample(torch.from_numpy(w), 8000, 16000).numpy() * 0.5
    p = tmp / "up16k.wav"
    sf.write(p, up, 16000, subtype="PCM_16")
    good["up16k"] = (p, "sixteen", sf.read(p, dtype="float32")[0], 16000)
    w4, _ = sf.read(files[4], dtype="float32")
    p = tmp / "stereo.flac"
    sf.write(p, np.stack([w4, 0.5 * w4], axis=1), 22050, subtype="PCM_16")
    both = sf.read(p, dtype="float32")[0]
    good["stereo"] = (p, "stereo words", both.mean(axis=1), 22050)
    bad = {"corrupt": tmp / "corrupt.wav", "empty": tmp / "empty.wav", "missing": tmp / "nope.wav"}
    bad["corrupt"].write_bytes(b"RIFF" + bytes(range(256)) * 8)
    sf.write(bad["empty"], np.zeros(0, dtype=np.float32), 8000)
    return good, bad


def _check_round_trip(out: Path, good: dict, rc: int) -> None:
    assert rc == 0
    samples, stats = _read_all(out / "shards.list")
    assert stats.as_dict() == {}
    assert set(samples) == set(good)
    for key, (_, text, wave, sr) in good.items():
        s = samples[key]
        assert s.text == text
        got, got_sr = decode_audio(s.audio)
        assert got_sr == sr, key
        np.testing.assert_allclose(got, wave, atol=PCM16, err_msg=key)
    assert not list(out.glob("*.tmp")), "temporary shard files left behind"


def test_manifest_round_trip_mixed_rates_stereo_and_bad_files(tmp_path, capsys):
    good, bad = _mixed_audio(tmp_path)
    rows = [f"{k}\t{p}\t{t}" for k, (p, t, _, _) in good.items()]
    rows += [f"{k}\t{p}\tsome words" for k, p in bad.items()]
    rows += [f"up16k\t{good['up16k'][0]}\tduplicate", "notext\tup16k.wav\t", "with.dot\tup16k.wav\tx"]
    (tmp_path / "m.tsv").write_text("id\tpath\ttext\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    rc = cli(["make-shards", "--manifest", str(tmp_path / "m.tsv"), "--out", str(out), "--per-shard", "2",
              "--num-workers", "2"])
    _check_round_trip(out, good, rc)
    assert len(read_shard_list(out / "shards.list")) == 3  # 5 good + 3 unreadable over shards of 2
    reasons = dict(line.split("\t")[:2] for line in (out / "skipped.tsv").read_text().splitlines())
    assert reasons == {"corrupt": "unreadable audio", "missing": "unreadable audio", "empty": "empty audio",
                       "up16k": "duplicate key", "notext": "missing transcript", "with.dot": "invalid key"}
    summary = capsys.readouterr().out
    assert "5 utterances" in summary and "unreadable audio" in summary


def test_jsonl_manifest_with_offset_and_duration(tmp_path):
    f = fsdd_files(1)[0]
    wave, sr = sf.read(f, dtype="float32")
    rows = [{"id": "whole", "path": str(f), "text": "a"},
            {"id": "cut", "path": str(f), "text": "b", "offset": 0.05, "duration": 0.1}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    assert cli(["make-shards", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(out),
                "--per-shard", "10", "--format", "wav"]) == 0
    samples, _ = _read_all(out / "shards.list")
    np.testing.assert_allclose(decode_audio(samples["cut"].audio)[0], wave[400:1200], atol=PCM16)
    np.testing.assert_allclose(decode_audio(samples["whole"].audio)[0], wave, atol=PCM16)


def test_kaldi_dir_round_trip_with_segments(tmp_path):
    good, bad = _mixed_audio(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    recs = {k: p for k, (p, _, _, _) in good.items()} | {"corrupt": bad["corrupt"]}
    (data / "wav.scp").write_text("".join(f"{k} {p}\n" for k, p in recs.items()) + "piped sox x.wav -t wav - |\n")
    segs = {f"{k}-a": (k, 0.0, 0.1) for k in good} | {f"{k}-b": (k, 0.1, 0.2) for k in good}
    segs["corrupt-a"] = ("corrupt", 0.0, 0.1)
    segs["piped-a"] = ("piped", 0.0, 0.1)
    (data / "segments").write_text("".join(f"{s} {r} {a} {b}\n" for s, (r, a, b) in segs.items()))
    texts = {s: f"text of {s}" for s in segs if s != "stereo-b"}
    (data / "text").write_text("".join(f"{s} {t}\n" for s, t in texts.items()) + "orphan hello\n")
    out = tmp_path / "out"
    rc = cli(["make-shards", "--data-dir", str(data), "--out", str(out), "--per-shard", "4"])
    expected = {}
    for seg, (rec, a, b) in segs.items():
        if rec in good and seg in texts:
            _, _, wave, sr = good[rec]
            expected[seg] = (None, texts[seg], wave[round(a * sr):round(b * sr)], sr)
    _check_round_trip(out, expected, rc)
    reasons = dict(line.split("\t")[:2] for line in (out / "skipped.tsv").read_text().splitlines())
    assert reasons == {"stereo-b": "missing transcript", "corrupt-a": "unreadable audio",
                       "piped-a": "unreadable audio", "orphan": "missing audio"}


def test_nothing_usable_is_the_only_failure(tmp_path):
    (tmp_path / "m.tsv").write_text("a\tmissing.wav\thello\n")
    assert cli(["make-shards", "--manifest", str(tmp_path / "m.tsv"), "--out", str(tmp_path / "o")]) == 1
    assert (tmp_path / "o" / "shards.list").read_text() == ""


def _shard_with(members: list[tuple[str, bytes]], path: Path) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_reader_resyncs_after_a_corrupt_header_and_survives_truncation(tmp_path):
    members = [(f"u{i}.{ext}", f"text {i}".encode() if ext == "txt" else b"\0" * 700)
               for i in range(4) for ext in ("txt", "wav")]
    path = _shard_with(members, tmp_path / "s.tar")
    raw = bytearray(path.read_bytes())
    raw[5 * 512 + 10] ^= 0xFF  # header of u1.txt (after u0.txt: 1+1 blocks, u0.wav: 1+2 blocks)
    path.write_bytes(bytes(raw))
    stats = DataStats()
    got = {s.key: s for s in read_shard(str(path), stats)}
    assert stats.as_dict() == {"corrupt tar member": 1}
    assert got["u1"].text is None and got["u1"].audio is not None  # the lost member is missing, not the shard
    assert [got[f"u{i}"].text for i in (0, 2, 3)] == ["text 0", "text 2", "text 3"]
    path.write_bytes(bytes(raw[:20 * 512 - 600]))  # cut inside u3.wav's data
    stats = DataStats()
    got = {s.key: s for s in read_shard(str(path), stats)}
    assert list(got) == ["u0", "u1", "u2", "u3"] and got["u3"].audio is None
    assert stats.as_dict() == {"corrupt tar member": 2}


def test_missing_shard_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.tar"):
        list(read_shard(str(tmp_path / "nothere.tar"), DataStats()))


def test_shards_are_webdataset_readable(corpus):
    import webdataset as wds
    keys = [s["__key__"] for s in wds.WebDataset(read_shard_list(corpus.shard_list), shardshuffle=False)]
    assert sorted(keys) == sorted(corpus.keys)


def test_header_probe_matches_decoding(tmp_path):
    f = fsdd_files(1)[0]
    w, sr = sf.read(f, dtype="float32")
    for fmt in ("WAV", "FLAC", "OGG"):
        buf = io.BytesIO()
        sf.write(buf, np.stack([w, w], 1), sr, format=fmt)
        info = probe_audio(buf.getvalue())
        assert (info.sample_rate, info.num_frames, info.channels) == (sr, len(w), 2), fmt
        decoded, decoded_sr = decode_audio(buf.getvalue())  # WAV: our own PCM16 reader; others: soundfile
        reference = sf.read(io.BytesIO(buf.getvalue()), dtype="float32")[0].mean(axis=1)
        assert decoded_sr == sr
        np.testing.assert_allclose(decoded, reference, atol=1e-7 if fmt != "OGG" else 1e-6)
