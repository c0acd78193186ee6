"""sherpa-onnx's own recognizers print what `moe-asr recognize` prints: real audio, trained models.

sherpa-onnx computes the fbank itself, and its public constructors (``from_wenet_ctc``) set only
the sample rate and the number of mel bins: the other options stay sherpa-onnx's defaults
(``snip_edges=False``, ``high_freq=-400``), and its offline WeNet CTC recognizer always dithers
by one 16-bit step. The models here use features with those options and a mel floor 40 dB above
that dither (``FEATURES``, as the digits recipe does: 8 kHz, 40 mel bins, every bin used), and
are decoded through sherpa-onnx's public API only (the exported ``decode.py`` for whole
utterances).

A model of each tokenizer type (words, characters with ▁, BPE), trained for STEPS steps on
FSDD digit sequences of four speakers, gives the same transcripts, words and spaces alike, in
both on sequences of the two held-out speakers: streaming, every one; offline, every one but
those with a frame whose best two tokens are within MARGIN (sherpa-onnx's dither still moves
a feature by up to 0.04 there), at most NEAR_TIES of 40. The int8 graphs (``export --int8``) decode
in sherpa-onnx too, offline and streaming, at the float graphs' word error rate within INT8_WER.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sherpa_onnx
import soundfile as sf
import torch
from torch.nn.utils.rnn import pad_sequence

from moe_asr.checkpoint import LoadedModel, load_model, save_model
from moe_asr.cli import main
from moe_asr.data.config import DataConfig, FeatureConfig, TokenizerConfig
from moe_asr.data.features import Fbank
from moe_asr.data.kaldi_text import read_table
from moe_asr.data.tokenizer import Tokenizer, train_tokenizer
from moe_asr.decode import DecodeOptions, decode
from moe_asr.decode.scoring import score
from moe_asr.model.config import DecoderConfig, EncoderConfig, ModelConfig
from moe_asr.model.u2pp import U2PPModel, build_model
from moe_asr.moe.config import MoEConfig
from moe_asr.run.config import ExperimentConfig
from moe_asr.symbols import IGNORE_ID
from tests.engine.conftest import DIGITS, FSDD, TRAIN_SPEAKERS

RATE, BINS = 8000, 40
FEATURES = FeatureConfig(sample_rate=RATE, num_mel_bins=BINS, snip_edges=False, high_freq=-400.0, mel_floor_db=40.0)
HELD_OUT = ("george", "yweweler")
CHUNK, LEFT = 4, 2
STEPS = 300
MARGIN = 0.01
NEAR_TIES = 4  # of the 40: enough left to compare; how many there are is the trained weights' doing
INT8_WER, INT8_CHANGED = 0.06, 6


def _sequences(speakers: tuple[str, ...], indices: range, n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """``n`` recordings of one to four digits: FSDD digits of one speaker, one after the other."""
    if not FSDD.is_dir():
        pytest.fail(f"real audio not found at {FSDD}: the shared data folder (../shared from the repo) is missing")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        speaker, digits = rng.choice(speakers), [rng.randrange(10) for _ in range(rng.randint(1, 4))]
        parts = [sf.read(str(FSDD / f"{d}_{speaker}_{rng.choice(indices)}.wav"), dtype="float32")[0] for d in digits]
        out.append((np.concatenate(parts), " ".join(DIGITS[d] for d in digits)))
    return out


@pytest.fixture(scope="module")
def heard(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray, str]]:
    """Held-out speakers' sequences as 16-bit WAVs, read by both sides: key -> (file, samples, reference)."""
    root = tmp_path_factory.mktemp("heard")
    out = {}
    for i, (wave, text) in enumerate(_sequences(HELD_OUT, range(50), 40, seed=1)):
        path = root / f"u{i:02d}.wav"
        sf.write(str(path), wave, RATE, subtype="PCM_16")
        out[path.stem] = (path, sf.read(str(path), dtype="float32")[0], text)
    return out


def _tokenizer(kind: str, texts: list[str], root: Path) -> Tokenizer:
    cfg, _ = train_tokenizer(texts, TokenizerConfig(type=kind), root / "lang", vocab_size=30 if kind == "bpe" else 0)
    return Tokenizer.from_config(cfg)


def _build(vocab_size: int, feats: list[torch.Tensor], root: Path) -> tuple[U2PPModel, ModelConfig]:
    """A small causal MoE model with CMVN over ``feats``."""
    stats = torch.cat(feats).double()
    cmvn = root / "cmvn.json"
    cmvn.write_text(json.dumps({"mean_stat": stats.sum(0).tolist(), "var_stat": stats.square().sum(0).tolist(),
                                "frame_num": stats.shape[0]}))
    cfg = ModelConfig(vocab_size=vocab_size, input_dim=BINS, cmvn=str(cmvn), ctc_weight=1.0,
                      encoder=EncoderConfig(output_size=32, attention_heads=2, linear_units=64, num_blocks=2,
                                            cnn_module_kernel=5, causal=True, dropout_rate=0.0,
                                            positional_dropout_rate=0.0),
                      decoder=DecoderConfig(attention_heads=2, linear_units=64, num_blocks=1, r_num_blocks=1),
                      moe=MoEConfig(num_experts=4, top_k=2))
    torch.manual_seed(0)
    return build_model(cfg), cfg


def _export(model: U2PPModel, cfg: ModelConfig, tokenizer: Tokenizer, root: Path) -> tuple[Path, Path]:
    data = DataConfig(features=FEATURES, tokenizer=tokenizer.cfg)
    model_file = save_model(root / "model.pt", model.state_dict(), ExperimentConfig(model=cfg, data=data), tokenizer)
    assert main(["export", "--model", str(model_file), "-o", str(root / "onnx"), "--sherpa-onnx", "--int8",
                 "--chunk-size", str(CHUNK), "--num-left-chunks", str(LEFT)]) == 0
    return model_file, root / "onnx" / "sherpa-onnx"


@pytest.fixture(scope="module", params=["word", "char", "bpe"])
def trained(request, tmp_path_factory) -> tuple[Path, Path]:
    """A model of each tokenizer type trained (CTC, Adam, dither 1.0 as in training) on 600 sequences
    of four speakers; its consolidated file and its sherpa-onnx folder."""
    root = tmp_path_factory.mktemp(f"trained_{request.param}")
    train = _sequences(TRAIN_SPEAKERS, range(5, 50), 600, seed=0)
    tokenizer = _tokenizer(request.param, [t for _, t in train], root)
    fbank = Fbank(FEATURES)
    model, cfg = _build(tokenizer.vocab_size, fbank([torch.from_numpy(w) for w, _ in train]), root)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng, noise = random.Random(0), torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and the machine's cores are shared
    for _ in range(STEPS):
        batch = rng.sample(train, 16)
        feats = fbank([torch.from_numpy(w) for w, _ in batch], dither=FEATURES.dither, generator=noise)
        targets = [torch.tensor(tokenizer.encode(t)) for _, t in batch]
        loss = model(pad_sequence(feats, batch_first=True), torch.tensor([len(f) for f in feats]),
                     pad_sequence(targets, batch_first=True, padding_value=IGNORE_ID),
                     torch.tensor([len(t) for t in targets]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return _export(model.eval(), cfg, tokenizer, root)


def _recognize(model_file: Path, wavs: list[Path], out: Path) -> dict[str, str]:
    assert main(["recognize", "--model", str(model_file), "--mode", "ctc_greedy_search", "-o", str(out),
                 *map(str, wavs)]) == 0
    return read_table(out / "ctc_greedy_search" / "text")


def _decode_py(sherpa_dir: Path, wavs: list[Path], *options: str) -> dict[str, str]:
    """The exported decode.py as a person runs it: sherpa-onnx's offline recognizer, public API."""
    out = subprocess.run([sys.executable, str(sherpa_dir / "decode.py"), *options, *map(str, wavs)], check=True,
                         capture_output=True, text=True).stdout
    return {key: text for key, _, text in (line.partition(" ") for line in out.splitlines())}


def _online(sherpa_dir: Path, graph: str = "model-streaming.onnx") -> sherpa_onnx.OnlineRecognizer:
    return sherpa_onnx.OnlineRecognizer.from_wenet_ctc(
        tokens=str(sherpa_dir / "tokens.txt"), model=str(sherpa_dir / graph), chunk_size=CHUNK,
        num_left_chunks=LEFT, num_threads=1, sample_rate=RATE, feature_dim=BINS)


def _streamed(rec: sherpa_onnx.OnlineRecognizer, loaded: LoadedModel, samples: np.ndarray) -> tuple[str, str, int]:
    """sherpa-onnx's streaming text, ours on the windows it decoded (whole windows only, as they fill), and
    how many feature frames those windows cover."""
    stream = rec.create_stream()
    stream.accept_waveform(RATE, samples)
    stream.input_finished()
    chunks = 0
    while rec.is_ready(stream):
        rec.decode_stream(stream)
        chunks += 1
    w = loaded.model.encoder.stream_windows(CHUNK, LEFT)
    covered = (chunks - 1) * w.stride + w.window
    feats = Fbank(loaded.config.data.features)([torch.from_numpy(samples)])[0][:covered]
    hyp = decode(loaded.model, feats[None], torch.tensor([len(feats)]), ["ctc_greedy_search"],
                 DecodeOptions(chunk_size=CHUNK, num_left_chunks=LEFT, streaming=True))["ctc_greedy_search"][0]
    return rec.get_result(stream), loaded.tokenizer.decode(hyp.tokens), covered


def _margin(model: U2PPModel, feats: torch.Tensor) -> float:
    """By how much (log-prob) the best CTC token beats the second best at the closest frame (full context)."""
    with torch.no_grad():
        enc, _ = model.encoder(feats[None], torch.tensor([feats.shape[0]]), -1, -1)
        top = model.ctc.log_softmax(enc)[0].topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def test_fbank_equals_sherpa_onnxs_bin_for_bin(trained, heard):
    """sherpa-onnx's features, set by its public constructor (rate and bins), are ours before the
    floor, which the graphs apply: every frame, every bin. (Its streaming recognizer shows them;
    the offline one computes them with the same options, then dithers.)"""
    _, sherpa_dir = trained
    rec = _online(sherpa_dir)
    fbank = Fbank(dataclasses.replace(FEATURES, mel_floor_db=None))
    for _, samples, _ in heard.values():
        ours = fbank([torch.from_numpy(samples)])[0]
        stream = rec.create_stream()
        stream.accept_waveform(RATE, samples)
        stream.input_finished()
        theirs = torch.tensor(stream.get_frames(0, len(ours))).view(len(ours), BINS)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-3)


def test_offline_recognizer_prints_our_transcripts_of_a_trained_model(trained, heard, tmp_path):
    model_file, sherpa_dir = trained
    wavs = [path for path, _, _ in heard.values()]
    ours, theirs = _recognize(model_file, wavs, tmp_path), _decode_py(sherpa_dir, wavs)
    loaded = load_model(model_file)
    fbank = Fbank(loaded.config.data.features)
    clear = {key for key, (_, samples, _) in heard.items()
             if _margin(loaded.model, fbank([torch.from_numpy(samples)])[0]) > MARGIN}
    assert len(clear) >= len(heard) - NEAR_TIES, f"near ties in {sorted(set(heard) - clear)}"
    assert {k: theirs[k] for k in clear} == {k: ours[k] for k in clear}
    cer = score({key: ref for key, (_, _, ref) in heard.items()}, ours, unit="char").error_rate
    assert cer < 0.6, f"the model has not learnt the digits (CER {cer:.2f} on held-out voices): {ours}"
    assert sum(" " in ours[k] for k in clear) >= 10, f"too few transcripts of several words: {ours}"


def test_online_recognizer_prints_our_streaming_transcripts_of_a_trained_model(trained, heard):
    model_file, sherpa_dir = trained
    loaded, rec = load_model(model_file), _online(sherpa_dir)
    said = {key: _streamed(rec, loaded, samples) for key, (_, samples, _) in heard.items()}
    assert {k: theirs for k, (theirs, _, _) in said.items()} == {k: ours for k, (_, ours, _) in said.items()}
    assert sum(" " in ours for _, ours, _ in said.values()) >= 10


def _online_text(rec: sherpa_onnx.OnlineRecognizer, samples: np.ndarray) -> str:
    stream = rec.create_stream()
    stream.accept_waveform(RATE, samples)
    stream.input_finished()
    while rec.is_ready(stream):
        rec.decode_stream(stream)
    return rec.get_result(stream)


def test_int8_graphs_decode_in_sherpa_onnx_as_the_float_ones(trained, heard):
    """sherpa-onnx runs the int8 twins (its contract is the float graphs' inputs, outputs and metadata,
    all kept); offline and streaming, their word error rate on the 40 held-out sequences is the float
    graphs' within INT8_WER (these small models have many near ties, and the offline recognizer
    dithers), and at most INT8_CHANGED transcripts differ."""
    _, sherpa_dir = trained
    refs = {key: ref for key, (_, _, ref) in heard.items()}
    wavs = [path for path, _, _ in heard.values()]
    offline = _decode_py(sherpa_dir, wavs), _decode_py(sherpa_dir, wavs, "--int8")
    streaming = [{key: _online_text(rec, samples) for key, (_, samples, _) in heard.items()}
                 for rec in (_online(sherpa_dir), _online(sherpa_dir, "model-streaming.int8.onnx"))]
    for fp, q in (offline, streaming):
        changed = {k: (fp[k], q[k]) for k in heard if fp[k] != q[k]}
        wer_fp, wer_q = score(refs, fp).error_rate, score(refs, q).error_rate
        assert abs(wer_q - wer_fp) <= INT8_WER and len(changed) <= INT8_CHANGED, (wer_fp, wer_q, changed)
        cer = score(refs, q, unit="char").error_rate
        assert cer < 0.6, f"the int8 graphs have lost the digits (CER {cer:.2f} on held-out voices): {q}"


def test_decode_py_streams_a_file_to_its_last_frame(trained, heard):
    """sherpa-onnx's online recognizer runs whole chunks only: the exported decode.py appends one chunk's
    window of silence (TAIL_SECONDS) before ending a streamed file, so the windows it decodes cover every
    feature frame of the file, where without it the last, partial chunk is dropped. What it prints is
    sherpa-onnx's text of the padded file, which is ours on the same windows."""
    model_file, sherpa_dir = trained
    tail = float(re.search(r"^TAIL_SECONDS = (.+)$", (sherpa_dir / "decode.py").read_text(), re.M).group(1))
    loaded, rec = load_model(model_file), _online(sherpa_dir)
    fbank = Fbank(loaded.config.data.features)
    printed = _decode_py(sherpa_dir, [path for path, _, _ in heard.values()], "--streaming")
    dropped = 0
    for key, (_, samples, _) in heard.items():
        frames = len(fbank([torch.from_numpy(samples)])[0])
        padded = np.concatenate([samples, np.zeros(int(tail * RATE), np.float32)])
        theirs, ours, covered = _streamed(rec, loaded, padded)
        assert covered >= frames and printed[key] == theirs == ours, (key, covered, frames, printed[key], theirs, ours)
        dropped += _streamed(rec, loaded, samples)[2] < frames
    assert dropped > len(heard) / 2, "without the tail, most files should end inside a chunk"
