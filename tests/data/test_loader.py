"""The training loader: rank/worker split, determinism, exact resume, frame budget, bad data, uneven ranks."""
from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from moe_asr.run.config import ExperimentConfig
from moe_asr.data.audio import encode_audio
from moe_asr.data.batching import dynamic_batches
from moe_asr.data.config import DataConfig
from moe_asr.data.loader import AsrDataLoader, build_loader
from moe_asr.data.manifest import Utterance
from moe_asr.data.pipeline import Pipeline, PlannedUtt, Position, worker_shards
from moe_asr.data.shards import ShardPart, read_shard, read_shard_list, write_shard, write_shard_list
from moe_asr.data.stats import SKIP_REASONS, UNEVEN_RANKS, DataStats, skip_line
from moe_asr.schema import ConfigError, from_dict

from .conftest import build_corpus, fsdd_files, transcript

TRAIN = {"features": {"speed_perturb": [0.9, 1.0, 1.1], "vtlp": [0.9, 1.0, 1.1]}, "specsub": {"enabled": True}, "channel_eq": {"enabled": True},
         "edge_crop": {"enabled": True},
         "batching": {"shuffle_size": 8, "sort_size": 4, "max_frames_in_batch": 400}, "filters": {"max_frames": 400}}


def _loader(corpus, rank=0, world_size=1, train=True, **overrides) -> AsrDataLoader:
    cfg = corpus.config(**overrides)
    return AsrDataLoader(corpus.shard_list, cfg, corpus.tokenizer(cfg), train=train, rank=rank,
                         world_size=world_size)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


@pytest.mark.slow
def test_two_ranks_two_workers_read_every_sample_once(corpus):
    seen = []
    for rank in range(2):
        loader = _loader(corpus, rank, 2, num_workers=2, **TRAIN)
        loader.set_epoch(3)
        seen += _keys(loader)
    assert sorted(seen) == sorted(corpus.keys)


@pytest.mark.slow
def test_same_seed_and_epoch_give_the_same_batches(corpus):
    def run(epoch, seed=777):
        loader = _loader(corpus, num_workers=2, seed=seed, **TRAIN)
        loader.set_epoch(epoch)
        return list(loader)

    a, b = run(1), run(1)
    assert _keys(a) == _keys(b)
    for x, y in zip(a, b):
        assert torch.equal(x.feats, y.feats) and torch.equal(x.targets, y.targets)
    assert _keys(run(2)) != _keys(a) and _keys(run(1, seed=5)) != _keys(a)
    assert sorted(_keys(run(2))) == sorted(corpus.keys)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(corpus, num_workers):
    full_loader = _loader(corpus, num_workers=num_workers, **TRAIN)
    full_loader.set_epoch(1)
    full = list(full_loader)
    assert len(full) >= 6
    for cut in (1, len(full) // 2, len(full) - 1):
        first = _loader(corpus, num_workers=num_workers, **TRAIN)
        first.set_epoch(1)
        head = []
        for batch in first:
            head.append(batch)
            if len(head) == cut:
                state = json.loads(json.dumps(first.state_dict()))
                break
        assert state["batches_delivered"] == cut and state["epoch"] == 1
        resumed = _loader(corpus, num_workers=num_workers, **TRAIN)
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # a trainer's usual call must not lose the position
        tail = list(resumed)
        assert _keys(head + tail) == _keys(full), f"cut at {cut}"
        for x, y in zip(head + tail, full):
            assert torch.equal(x.feats, y.feats)
        assert resumed.state_dict()["complete"]


def test_resume_refuses_a_different_setup(corpus):
    state = _loader(corpus).state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        _loader(corpus, num_workers=2).load_state_dict(state)


def test_dynamic_batches_never_exceed_the_budget():
    rng = random.Random(0)
    for budget in (50, 333, 1000):
        items = [PlannedUtt("k", b"", 8000, 0, [], 1.0, 1.0, rng.randint(1, budget)) for _ in range(500)]
        batches = list(dynamic_batches(items, budget))
        assert [x for b in batches for x in b] == items
        assert all(len(b) * max(x.num_frames for x in b) <= budget for b in batches)
        # greedy: adding the next item would have broken the budget
        for b, nxt in zip(batches, batches[1:]):
            assert (len(b) + 1) * max(x.num_frames for x in b + nxt[:1]) > budget


def test_pipeline_batches_respect_the_frame_budget_and_padding(corpus):
    batches = list(_loader(corpus, **TRAIN))
    assert sorted(_keys(batches)) == sorted(corpus.keys)
    for b in batches:
        B, T, F = b.feats.shape
        assert B * T <= 400 and F == 80 and b.feats.dtype == torch.float32
        assert T == int(b.feats_lengths.max())
        for i in range(B):
            assert (b.feats[i, b.feats_lengths[i]:] == 0).all()
            assert (b.targets[i, b.target_lengths[i]:] == -1).all()
            assert (b.targets[i, :b.target_lengths[i]] >= 2).all()


def test_static_batches_and_eval_mode(corpus):
    loader = _loader(corpus, train=False, batching={"batch_type": "static", "batch_size": 3})
    batches = list(loader)
    assert [len(b) for b in batches] == [3] * 13 + [1]
    assert sorted(_keys(batches)) == sorted(corpus.keys)
    loader.set_epoch(5)  # no training randomness: every epoch is the same
    again = list(loader)
    assert all(torch.equal(a.feats, b.feats) for a, b in zip(batches, again))


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _bad_shards(tmp_path) -> Path:
    """Two shards: four good utterances among one of each kind of bad one, and one corrupt member."""
    files = fsdd_files(4, start=3)
    wave, sr = sf.read(files[0], dtype="float32")
    nan_wav = io.BytesIO()
    sf.write(nan_wav, np.where(np.arange(len(wave)) == 100, np.nan, wave).astype(np.float32), sr,
             format="WAV", subtype="FLOAT")
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, f in enumerate(files):
            _member(tar, f"good{i}.txt", transcript(f).encode())
            _member(tar, f"good{i}.flac", encode_audio(sf.read(f, dtype="float32")[0], sr, "flac"))
        _member(tar, "garbage.txt", b"zero")
        _member(tar, "garbage.flac", bytes(random.Random(0).randbytes(3000)))
        _member(tar, "unknown.txt", b"### %%%")
        _member(tar, "unknown.flac", encode_audio(wave, sr, "flac"))
        _member(tar, "empty.txt", b"zero")
        _member(tar, "empty.wav", encode_audio(np.zeros(0, np.float32), sr, "wav"))
        _member(tar, "nan.txt", b"zero")
        _member(tar, "nan.wav", nan_wav.getvalue())
        _member(tar, "notext.flac", encode_audio(wave, sr, "flac"))
        _member(tar, "tooshort.txt", b"zero")
        _member(tar, "tooshort.wav", encode_audio(wave[:100], sr, "wav"))
    raw = bytearray(shard.read_bytes())
    write_shard(tmp_path / "second.tar", [Utterance("late", str(files[0]), "zero")], "flac")
    second = bytearray((tmp_path / "second.tar").read_bytes())
    second[20] ^= 0xFF  # corrupt the header of late.txt
    (tmp_path / "second.tar").write_bytes(bytes(second))
    shard.write_bytes(bytes(raw))
    write_shard_list([str(shard), str(tmp_path / "second.tar")], tmp_path / "list")
    return tmp_path / "list"


BAD_SKIPS = {"undecodable audio": 1, "no known token": 1, "empty audio": 1, "non-finite features": 1,
             "missing transcript": 2, "corrupt tar member": 1, "filtered: frames out of range": 1}


def _bad_loader(corpus, shard_list: Path, **overrides) -> AsrDataLoader:
    cfg = corpus.config(train_shards=str(shard_list), filters={"min_frames": 5}, **overrides)
    return AsrDataLoader(shard_list, cfg, corpus.tokenizer(cfg), world_size=1, rank=0)


def test_bad_samples_are_counted_not_fatal(corpus, tmp_path):
    loader = _bad_loader(corpus, _bad_shards(tmp_path))
    assert sorted(_keys(loader)) == ["good0", "good1", "good2", "good3"]
    assert loader.skipped == BAD_SKIPS
    assert set(loader.skipped) <= set(SKIP_REASONS)  # the reasons the training loop sums and logs


def test_bad_samples_are_logged_by_key_in_the_first_pass_only(corpus, tmp_path, caplog):
    """Each epoch reads the same bad samples: their keys are logged once, their counts every epoch."""
    loader = _bad_loader(corpus, _bad_shards(tmp_path))
    passes = []
    for epoch in range(2):
        caplog.clear()
        loader.set_epoch(epoch)
        with caplog.at_level(logging.WARNING, logger="moe_asr.data"):
            list(loader)
        passes.append([r.getMessage() for r in caplog.records if r.name == "moe_asr.data"])
        assert loader.skipped == BAD_SKIPS
    for key in ("garbage", "unknown", "empty", "nan", "notext"):
        assert any(line.startswith(f"skipped {key} (") for line in passes[0]), (key, passes[0])
    assert passes[1] == []


def test_per_sample_warnings_stop_after_the_first_few(caplog):
    with caplog.at_level(logging.WARNING, logger="moe_asr.data"):
        quiet = DataStats(log_details=False)
        for i in range(3):
            quiet.bad("empty audio", f"q{i}")
        assert caplog.records == [] and quiet.as_dict() == {"empty audio": 3}
        stats = DataStats()
        for i in range(8):
            stats.bad("empty audio", f"k{i}", "zero samples")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "skipped k0 (empty audio: zero samples)"
    assert len(lines) == 5 and lines[-1].endswith("more of this kind are only counted")
    assert stats.as_dict() == {"empty audio": 8}


def test_skip_line_names_the_reasons_largest_first():
    assert skip_line({"empty audio": 1, "filtered: frames out of range": 2, "bad transcript": 0}) == \
        "3 (filtered: frames out of range 2, empty audio 1)"
    assert skip_line({r: 0 for r in SKIP_REASONS}) == "0"


def test_too_few_shards_for_the_ranks_name_the_list_and_the_fix(corpus):
    """A config mistake (a ConfigError, which launch/train.py prints as one line), naming the list."""
    cfg = corpus.config(cv_shards=str(corpus.shard_list), num_workers=2)
    for split in ("train", "cv"):
        with pytest.raises(ConfigError, match=rf"^data\.{split}_shards \({re.escape(str(corpus.shard_list))}\): "
                                              rf"8 shard\(s\) cannot feed 9 ranks; .* = 18 shards.*"
                                              rf"moe-asr make-shards --per-shard N"):
            build_loader(cfg, split, corpus.tokenizer(cfg), rank=0, world_size=9)
    assert len(build_loader(cfg, "cv", corpus.tokenizer(cfg), rank=7, world_size=8).shards) == 8  # one a rank: enough


def test_shards_that_do_not_divide_over_the_ranks_warn_what_it_costs(corpus, caplog):
    """8 shards over 3 ranks: the last 2 of each epoch's order are shared sample by sample, so every rank
    reads their headers; the warning says so and how to avoid it. 8 over 4 divide: no warning."""
    cfg = corpus.config(cv_shards=str(corpus.shard_list), num_workers=1)
    with caplog.at_level("WARNING", logger="moe_asr.data.loader"):
        build_loader(cfg, "train", corpus.tokenizer(cfg), rank=0, world_size=3)
        build_loader(cfg, "cv", corpus.tokenizer(cfg), rank=0, world_size=3)
        build_loader(cfg, "train", corpus.tokenizer(cfg), rank=0, world_size=4)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"data.{split}_shards ({corpus.shard_list}): 8 shards over 3 ranks: every rank reads the "
                     f"headers of 2 shard(s) to take its share of their samples; write a multiple of 3 shards to "
                     f"read each shard once" for split in ("train", "cv")]


@pytest.mark.parametrize("world_size,num_workers", [(3, 1), (3, 2), (5, 2), (8, 1)])
def test_shares_of_the_ranks_differ_by_at_most_one_utterance_per_shared_shard(corpus, world_size, num_workers):
    """Every sample goes to exactly one (rank, worker), and with 8 shards of 5 the ranks' shares differ by
    at most one utterance per shard of the remainder (whole shards would differ by 5)."""
    cfg = corpus.config(num_workers=num_workers)
    pipeline = Pipeline(cfg, corpus.tokenizer(cfg), train=True)
    shards = read_shard_list(corpus.shard_list)
    shares = []
    for rank in range(world_size):
        keys = [s.key for w in range(num_workers)
                for s in pipeline.samples(worker_shards(shards, 7, 2, rank, world_size, w, num_workers, True),
                                          DataStats(), Position())]
        shares.append(keys)
    assert sorted(k for share in shares for k in share) == sorted(corpus.keys)
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= len(shards) % world_size, sizes


def test_a_shared_shard_counts_each_bad_sample_on_one_rank_only(tmp_path):
    """The samples a rank does not take are seeked over, never yielded: a sample with no transcript in a
    shard shared by 3 ranks reaches one rank only, so it is counted once over all ranks."""
    wav = io.BytesIO()
    sf.write(wav, np.zeros(1600, dtype=np.int16), 16000, format="WAV", subtype="PCM_16")
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(7):
            for ext, data in (("wav", wav.getvalue()), ("txt", b"one")):
                if i == 4 and ext == "txt":
                    continue
                info = tarfile.TarInfo(f"u{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shares = [[(s.key, s.text is None) for s in read_shard(ShardPart(str(shard), 3, rank), DataStats())]
              for rank in range(3)]
    assert [[key for key, missing in share if missing] for share in shares] == [[], ["u4"], []]  # 4 % 3 == 1
    assert sorted(key for share in shares for key, _ in share) == [f"u{i}" for i in range(7)]


def test_unknown_skip_reason_is_refused():
    with pytest.raises(ValueError, match="SKIP_REASONS"):
        DataStats().bad("cosmic ray", "key")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_counts_survive_an_exact_resume(corpus, tmp_path, num_workers):
    """Cut after every batch: a resumed epoch ends with the counts of an uninterrupted one (decoding-time
    skips of the replayed batches included), and a checkpoint holds the counts at the cut."""
    shard_list = _bad_shards(tmp_path)
    setup = {"num_workers": num_workers, "batching": {"batch_type": "static", "batch_size": 1}}
    full = list(_bad_loader(corpus, shard_list, **setup))
    assert len(full) == 4
    for cut in range(1, len(full)):
        first = _bad_loader(corpus, shard_list, **setup)
        for n, _ in enumerate(first, 1):
            if n == cut:
                at_cut = first.skipped
                state = json.loads(json.dumps(first.state_dict()))
                break
        resumed = _bad_loader(corpus, shard_list, **setup)
        resumed.load_state_dict(state)
        assert resumed.skipped == at_cut, f"cut at {cut}"
        assert len(list(resumed)) == len(full) - cut
        assert resumed.skipped == BAD_SKIPS, f"cut at {cut}"


def test_missing_shard_file_is_a_clear_error(corpus, tmp_path):
    write_shard_list([str(tmp_path / "gone-000.tar")], tmp_path / "list")
    cfg = corpus.config()
    with pytest.raises(FileNotFoundError, match="gone-000.tar"):
        AsrDataLoader(tmp_path / "list", cfg, corpus.tokenizer(cfg), rank=0, world_size=1)


def test_config_section_validates():
    cfg = from_dict(ExperimentConfig, {"model": {"vocab_size": 10}, "data": {"batching": {"batch_size": 4}}})
    assert cfg.data.batching.batch_size == 4 and cfg.data.features.num_mel_bins == 80
    with pytest.raises(ConfigError, match="data.batching.max_frames_in_batch"):
        from_dict(ExperimentConfig, {"model": {"vocab_size": 10}, "data": {"batching": {"max_frames_in_batch": 0}}})
    with pytest.raises(ConfigError, match="filters.max_frames"):
        from_dict(DataConfig, {"filters": {"max_frames": 20000}})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(DataConfig, {"feature": {}})


def _uneven_rank(rank: int, init_file: str, shard_list: str, units: str, out) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = from_dict(DataConfig, {"num_workers": 1, "tokenizer": {"symbol_table": units}, "filters": {"min_frames": 1},
                                 "batching": {"batch_type": "static", "batch_size": 1}})
    from moe_asr.data.tokenizer import Tokenizer
    loader = AsrDataLoader(shard_list, cfg, Tokenizer.from_config(cfg.tokenizer))
    counts, dropped = [], []
    for epoch in range(2):
        loader.set_epoch(epoch)
        n = 0
        for _ in loader:
            t = torch.ones(1)
            dist.all_reduce(t)  # what a training step does: a collective per batch
            n += 1
        counts.append(n)
        dropped.append(loader.skipped.get(UNEVEN_RANKS, 0))
    out.put((rank, (counts, dropped)))
    dist.destroy_process_group()


@pytest.mark.slow
def test_uneven_ranks_stop_together(tmp_path):
    """Shards of 2 and 9 utterances over 2 ranks: both ranks run 2 steps, nobody hangs, and the
    7 utterances the longer rank could not train on are all counted as dropped."""
    corpus = build_corpus(tmp_path, 11, 9)  # shard sizes 9 and 2
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_uneven_rank, args=(r, str(tmp_path / "init"), str(corpus.shard_list),
                                                    str(corpus.units), out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=120) for _ in procs)  # a hang (ranks disagreeing) times out here
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert results[0][0] == results[1][0] == [2, 2]
    assert [a + b for a, b in zip(results[0][1], results[1][1])] == [7, 7]
