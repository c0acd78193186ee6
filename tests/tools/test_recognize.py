"""`moe-asr recognize` on real FSDD audio writes what `decode()` gives on independently computed features.

A small random model, its output layers set by hand so that it says something
different for each utterance and other things with a chunked context, with CMVN
over the test audio, is saved as a consolidated file. The expected transcripts come from
torchaudio's own resampling and Kaldi fbank (no dither) and one `decode()` call
per utterance; the tool reads WAV paths, a wav.scp or shards, sorts and batches
the utterances, and must write the same text for every mode.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from torch.nn.utils.rnn import pad_sequence
from torchaudio.compliance import kaldi

from moe_asr.checkpoint import load_model, read_model_state, save_model
from moe_asr.cli import main
from moe_asr.data.cmvn import compute_cmvn, save_cmvn
from moe_asr.data.config import DataConfig, FeatureConfig, TokenizerConfig
from moe_asr.data.feature_batches import utterance_features
from moe_asr.data.features import Fbank, num_frames, resampled_length
from moe_asr.data.kaldi_text import read_table
from moe_asr.data.manifest import Utterance
from moe_asr.data.shards import SHARD_LIST, read_shard_list, write_shards
from moe_asr.data.sources import wav_files
from moe_asr.data.tokenizer import Tokenizer, read_symbol_table
from moe_asr.decode import METHODS, DecodeOptions, decode
from moe_asr.run.layout import INDEX
from moe_asr.run.config import ExperimentConfig
from moe_asr.model.config import DecoderConfig, EncoderConfig, ModelConfig
from moe_asr.model.targets import add_sos_eos
from moe_asr.model.u2pp import build_model
from moe_asr.moe.config import MoEConfig
from moe_asr.symbols import IGNORE_ID
from moe_asr.inference import pipeline, transcribe
from tests.engine.conftest import (DIGITS, FSDD, SMALL_MODEL, UNITS, build_corpus, data_overrides, run_training,
                                   train_cmd)

KEYS = ["3_jackson_12", "0_george_0", "7_theo_5", "9_nicolas_30", "5_yweweler_2", "1_lucas_7"]
BEAM = 4


def _word(key: str) -> str:
    return DIGITS[int(key.split("_")[0])]


@pytest.fixture(scope="module")
def wavs() -> dict[str, Path]:
    paths = {k: FSDD / f"{k}.wav" for k in KEYS}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        pytest.fail(f"FSDD audio missing: {missing}")
    return paths


@pytest.fixture(scope="module")
def shards(wavs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards([Utterance(k, str(p), _word(k)) for k, p in wavs.items()], out, per_shard=4)
    return out / SHARD_LIST


def _centre(layer: torch.nn.Linear, hidden: torch.Tensor, seed: int) -> None:
    """Unit-variance random weights and the bias that cancels the mean of ``hidden``: a random model's states
    share one large component, and logits that follow it say the same token for everything."""
    layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(seed)))
    layer.bias.copy_(-layer.weight @ hidden.mean(0))


@pytest.fixture(scope="module")
def model_file(wavs, shards, tmp_path_factory) -> Path:
    """A random model that says different things for different utterances, and other things again with
    a chunked or a shorter left context (the tests check it does)."""
    root = tmp_path_factory.mktemp("model")
    units = root / "units.txt"
    units.write_text("".join(f"{t} {i}\n" for i, t in enumerate(UNITS)))
    data = DataConfig(tokenizer=TokenizerConfig(symbol_table=str(units)))
    save_cmvn(compute_cmvn(read_shard_list(shards), data.features), root / "cmvn.json")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(UNITS), input_dim=80, cmvn=str(root / "cmvn.json"),
                      encoder=EncoderConfig(output_size=32, attention_heads=2, linear_units=48, num_blocks=2,
                                            cnn_module_kernel=5),
                      decoder=DecoderConfig(attention_heads=2, linear_units=48, num_blocks=1, r_num_blocks=1),
                      moe=MoEConfig(num_experts=4, top_k=2))
    model = build_model(cfg).eval()
    tokenizer = Tokenizer(data.tokenizer, read_symbol_table(units))
    feats = [_features(p, data.features) for p in wavs.values()]
    targets = [torch.tensor(tokenizer.encode(_word(k))) for k in wavs]
    with torch.no_grad():
        for layer in model.encoder.encoders:  # attention that weighs: what a chunk sees changes its output
            layer.self_attn.linear_out.weight.mul_(3.0)
        memory, mask = model.encode(pad_sequence(feats, batch_first=True), torch.tensor([len(f) for f in feats]),
                                    chunk_size=-1)
        _centre(model.ctc.ctc_lo, memory[mask.squeeze(1)], seed=1)
        ys_in, _ = add_sos_eos(pad_sequence(targets, batch_first=True, padding_value=IGNORE_ID), model.sos, model.eos)
        ys_lens = torch.tensor([len(t) + 1 for t in targets])
        for seed, dec in enumerate((model.decoder.left_decoder, model.decoder.right_decoder), start=2):
            hidden = []  # the states the output layer sees, teacher-forced on the transcripts
            hook = dec.output_layer.register_forward_pre_hook(lambda module, args: hidden.append(args[0]))
            dec(memory, mask, ys_in, ys_lens)
            hook.remove()
            _centre(dec.output_layer, hidden[0][torch.arange(ys_in.shape[1]) < ys_lens[:, None]], seed)
    return save_model(root / "model.pt", model.state_dict(), ExperimentConfig(model=cfg, data=data), tokenizer)


def _features(path: Path, cfg: FeatureConfig) -> torch.Tensor:
    """The documented recipe, with torchaudio's own functions: resample to the model rate, Kaldi fbank, no dither."""
    wave, sr = sf.read(str(path), dtype="float32")
    wave = torchaudio.functional.resample(torch.from_numpy(wave), sr, cfg.sample_rate)
    return kaldi.fbank(wave[None] * 32768, num_mel_bins=cfg.num_mel_bins, frame_length=cfg.frame_length_ms,
                       frame_shift=cfg.frame_shift_ms, dither=0.0, energy_floor=0.0,
                       sample_frequency=cfg.sample_rate)


def _expected(model_file: Path, paths: dict[str, Path], modes=METHODS, **opts) -> dict[str, dict[str, str]]:
    """Per mode, the transcript of each utterance decoded alone."""
    loaded = load_model(model_file)
    out: dict[str, dict[str, str]] = {m: {} for m in modes}
    for key, path in paths.items():
        feats = _features(path, loaded.config.data.features)
        hyps = decode(loaded.model, feats[None], torch.tensor([feats.shape[0]]), modes,
                      DecodeOptions(beam_size=BEAM, **opts))
        for m in modes:
            out[m][key] = loaded.tokenizer.decode(hyps[m][0].tokens)
    return out


def _recognize(model_file: Path, out: Path, *args: str) -> int:
    return main(["recognize", "--model", str(model_file), "--beam-size", str(BEAM), "-o", str(out), *args])


@pytest.fixture(scope="module")
def expected(model_file, wavs) -> dict[str, dict[str, str]]:
    return _expected(model_file, wavs)


@pytest.mark.parametrize("kind", ["wav", "wav_scp", "shards"])
def test_every_mode_writes_what_decode_gives(kind, model_file, wavs, shards, expected, tmp_path):
    if kind == "wav":
        inputs = [str(p) for p in wavs.values()]
    elif kind == "wav_scp":
        scp = tmp_path / "wav.scp"
        scp.write_text("".join(f"{k} {p}\n" for k, p in reversed(wavs.items())))
        inputs = ["--wav-scp", str(scp)]
    else:
        inputs = ["--shards", str(shards)]
    out = tmp_path / "out"
    # 300 frames: the six utterances (67..89 frames) come in several padded batches.
    assert _recognize(model_file, out, *inputs, "--mode", ",".join(METHODS), "--batch-frames", "300") == 0
    for m in METHODS:
        lines = (out / m / "text").read_text().splitlines()
        assert [ln.split()[0] for ln in lines] == sorted(KEYS), "one line per utterance, sorted by key"
        assert read_table(out / m / "text") == expected[m], m
        assert len(set(expected[m].values())) >= 4, f"{m}: the model should say different things: {expected[m]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["utterances"] == len(KEYS) and summary["skipped"] == 0
    assert summary["audio_seconds"] == pytest.approx(sum(sf.info(str(p)).duration for p in wavs.values()))
    assert set(summary["modes"]) == set(METHODS) and all(v["rtf"] > 0 for v in summary["modes"].values())
    assert summary["checkpoints"] == [str(model_file)]
    assert (out / "skipped.txt").read_text() == ""
    if kind == "shards":
        assert read_table(out / "ref.text") == {k: _word(k) for k in KEYS}
    else:
        assert not (out / "ref.text").exists()


def test_8k_and_16k_input_give_the_same_features_at_the_model_rate(model_file, wavs, tmp_path):
    rate = load_model(model_file).config.data.features
    wave, sr = sf.read(str(wavs[KEYS[0]]), dtype="float32")
    assert sr == 8000 and rate.sample_rate == 16000
    up = tmp_path / "up_16k.wav"
    sf.write(str(up), torchaudio.functional.resample(torch.from_numpy(wave), 8000, 16000).numpy(), 16000,
             subtype="FLOAT")
    fbank = Fbank(rate)
    feats8, feats16 = (utterance_features(next(iter(wav_files([p]))), fbank) for p in (wavs[KEYS[0]], up))
    frames = num_frames(resampled_length(len(wave), 8000, 16000), rate)
    assert feats8.shape == feats16.shape == (frames, 80), "100 frames a second at 16 kHz, whatever the input rate"
    torch.testing.assert_close(feats8, feats16, atol=1e-2, rtol=0)
    out = tmp_path / "out"
    assert _recognize(model_file, out, str(wavs[KEYS[0]]), str(up), "--mode", "ctc_greedy_search,attention") == 0
    for m in ("ctc_greedy_search", "attention"):
        text = read_table(out / m / "text")
        assert text[KEYS[0]] == text["up_16k"], m


def test_bad_audio_is_skipped_and_listed(model_file, wavs, shards, tmp_path):
    garbage, empty, short = tmp_path / "garbage.wav", tmp_path / "empty.wav", tmp_path / "short.wav"
    garbage.write_bytes(b"RIFF not really a wave file at all")
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 8000, subtype="PCM_16")
    sf.write(str(short), np.zeros(50, dtype=np.float32), 8000, subtype="PCM_16")  # under one 25 ms frame
    good = [str(wavs[k]) for k in KEYS[:3]]
    out = tmp_path / "out"
    assert _recognize(model_file, out, good[0], str(garbage), good[1], str(empty), str(short), good[2],
                      "--mode", "ctc_greedy_search") == 0
    assert sorted(read_table(out / "ctc_greedy_search" / "text")) == sorted(KEYS[:3])
    skipped = {ln.split("\t")[0]: ln.split("\t")[1] for ln in (out / "skipped.txt").read_text().splitlines()}
    assert skipped == {"garbage": "unreadable audio", "empty": "empty audio", "short": "empty audio"}
    assert json.loads((out / "summary.json").read_text())["skipped"] == 3

    # A shard whose audio member is damaged (same size, so the tar stays valid): that utterance is skipped,
    # keeps its reference (so scoring counts it as missed), and the rest of the shard is decoded.
    first_shard = Path(shards.read_text().splitlines()[0])
    damaged = tmp_path / "damaged.tar"
    data = bytearray(first_shard.read_bytes())
    with tarfile.open(first_shard) as tar:
        member = next(m for m in tar.getmembers() if m.name == f"{KEYS[1]}.wav")
    data[member.offset_data:member.offset_data + member.size] = b"\x07" * member.size
    damaged.write_bytes(bytes(data))
    (tmp_path / "one.list").write_text(f"{damaged}\n")
    out = tmp_path / "out_shard"
    assert _recognize(model_file, out, "--shards", str(tmp_path / "one.list"), "--mode", "ctc_greedy_search") == 0
    assert sorted(read_table(out / "ctc_greedy_search" / "text")) == sorted(set(KEYS[:4]) - {KEYS[1]})
    assert [ln.split("\t")[:2] for ln in (out / "skipped.txt").read_text().splitlines()] == \
        [[KEYS[1], "unreadable audio"]]
    assert read_table(out / "ref.text") == {k: _word(k) for k in KEYS[:4]}


def test_chunked_and_streaming_results_sit_beside_full_context(model_file, wavs, tmp_path):
    out = tmp_path / "out"
    paths = [str(p) for p in wavs.values()]
    mode = ["--mode", "ctc_greedy_search,attention_rescoring"]
    assert _recognize(model_file, out, *paths, *mode) == 0
    assert _recognize(model_file, out, *paths, *mode, "--chunk-size", "4", "--num-left-chunks", "1") == 0
    assert _recognize(model_file, out, *paths, *mode, "--chunk-size", "4", "--streaming") == 0
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == ["attention_rescoring", "attention_rescoring_chunk4_left1", "attention_rescoring_chunk4_streaming",
                    "ctc_greedy_search", "ctc_greedy_search_chunk4_left1", "ctc_greedy_search_chunk4_streaming"]
    modes = ("ctc_greedy_search", "attention_rescoring")
    full = _expected(model_file, wavs, modes)
    chunked = _expected(model_file, wavs, modes, chunk_size=4, num_left_chunks=1)
    streamed = _expected(model_file, wavs, modes, chunk_size=4, streaming=True)
    for m in modes:  # else a tool that ignored --chunk-size or --num-left-chunks would pass
        assert chunked[m] != full[m] and streamed[m] != chunked[m], (full[m], chunked[m], streamed[m])
        assert read_table(out / m / "text") == full[m], m
        assert read_table(out / f"{m}_chunk4_left1" / "text") == chunked[m], m
        assert read_table(out / f"{m}_chunk4_streaming" / "text") == streamed[m], m


def test_input_and_model_errors_are_one_line(model_file, wavs, tmp_path, capsys):
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    cases = [
        (["--model", str(model_file), str(tmp_path / "absent.wav")], "no such audio file"),
        (["--model", str(model_file), "--wav-scp", str(tmp_path / "absent.scp")], "no such file"),
        (["--model", str(model_file), "--shards", str(tmp_path / "absent.list")], "shard list not found"),
        (["--model", str(not_a_model), str(wavs[KEYS[0]])], "cannot read this checkpoint file"),
        (["--model", str(tmp_path), str(wavs[KEYS[0]])], "not a run directory"),
        (["--model", str(model_file)], "give exactly one input"),
        (["--model", str(model_file), str(wavs[KEYS[0]]), "--streaming"], "--streaming needs --chunk-size"),
    ]
    for args, message in cases:
        assert main(["recognize", *args, "-o", str(tmp_path / "out")]) == 1, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)


def _assert_mean(state: dict[str, torch.Tensor], sources: list[dict[str, torch.Tensor]]) -> None:
    """``state`` is the element-wise mean of ``sources`` (integer buffers: the first source's)."""
    assert state.keys() == sources[0].keys()
    for key, value in state.items():
        if value.is_floating_point():
            mean = sum(s[key].double() for s in sources) / len(sources)
            torch.testing.assert_close(value.double(), mean, rtol=0, atol=1e-5, msg=key)
        else:
            assert torch.equal(value, sources[0][key]), key


@pytest.mark.slow
def test_average_decodes_the_mean_of_the_best_checkpoints(wavs, tmp_path, monkeypatch):
    """Two epochs of real training leave two checkpoints with a CV loss: `recognize --average 2` decodes
    with, and `convert average --run --best 2` writes, the mean of the two, read here one by one."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    corpus = build_corpus(tmp_path / "corpus", range(0, 1), range(45, 46), 20)
    run = tmp_path / "run"
    overrides = {**SMALL_MODEL, **data_overrides(corpus), "parallel.ep_size": 1, "train.max_epochs": 2,
                 "train.warmup_steps": 1, "train.log_interval": 1}
    run_training(train_cmd(corpus, run, "ds_configs/zero0_cpu.json", overrides, 0, launcher="python"))
    index = json.loads((run / "checkpoints" / INDEX).read_text())
    best = [run / "checkpoints" / c["tag"] for c in sorted((c for c in index if c["cv_loss"] is not None),
                                                            key=lambda c: c["cv_loss"])[:2]]
    states = [read_model_state(p).state for p in best]
    assert len(states) == 2 and max(float((a - states[1][k]).abs().max()) for k, a in states[0].items()
                                    if a.is_floating_point()) > 1e-3, "the two checkpoints should differ"

    decoded_with = []
    monkeypatch.setattr(pipeline, "decode", lambda model, *a, **kw: decoded_with.append(model) or
                        decode(model, *a, **kw))
    out = tmp_path / "out"
    assert _recognize(run, out, *[str(p) for p in wavs.values()], "--average", "2") == 0
    assert json.loads((out / "summary.json").read_text())["checkpoints"] == [str(p) for p in best]
    assert decoded_with and all(m is decoded_with[0] for m in decoded_with)
    _assert_mean(decoded_with[0].state_dict(), states)

    assert main(["convert", "average", "--run", str(run), "--best", "2", "-o", str(tmp_path / "avg.pt")]) == 0
    _assert_mean(read_model_state(tmp_path / "avg.pt").state, states)


def test_transcribe_is_recognize_in_three_lines(model_file, wavs, tmp_path):
    """The library call the README shows gives what decoding each utterance alone gives, under its options."""
    options = DecodeOptions(chunk_size=4, num_left_chunks=1, beam_size=BEAM)
    texts = transcribe(model_file, list(wavs.values()), options)
    chunked = _expected(model_file, wavs, ["attention_rescoring"], chunk_size=4, num_left_chunks=1)
    assert texts == chunked["attention_rescoring"]
    assert texts != _expected(model_file, wavs, ["attention_rescoring"])["attention_rescoring"]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match="^broken: "):
        transcribe(model_file, [broken, wavs[KEYS[0]]])
