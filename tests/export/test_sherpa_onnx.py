"""sherpa-onnx's own recognizers decode our exported files as `moe-asr recognize` does.

The model is a small random one (CTC sharpened so that it says something)
with CMVN over the test audio, saved as a consolidated file and exported with
``moe-asr export --sherpa-onnx``. sherpa-onnx computes its own fbank: with
``snip_edges=True, high_freq=0`` (Kaldi's defaults, ours) it equals ours to
0.01 on mel bins 0-24, but sherpa-onnx 2.0.1's filterbank departs from
Kaldi's further up (measured: 0.03-0.06 on bins 28-56, 0.3 at bin 64, 7.5 at
bin 76 of 80). The test model therefore ignores bins 24 and up (CMVN scale 0
there), so the comparison tests the graph contract, not the two filterbanks.
Utterances where a frame's best CTC token wins by less than MARGIN are left out
of the comparison (a near-tie may flip on that 0.01). Both sides get the same
16 kHz waveform (resampled from FSDD's 8 kHz by us:
sherpa-onnx's own resampler is another one).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sherpa_onnx
import soundfile as sf
import torch
from sherpa_onnx.lib._sherpa_onnx import OfflineRecognizer as _OfflineImpl
from sherpa_onnx.lib._sherpa_onnx import OnlineRecognizer as _OnlineImpl

from moe_asr.checkpoint import load_model, save_model
from moe_asr.cli import main
from moe_asr.data.config import DataConfig, FeatureConfig, TokenizerConfig
from moe_asr.data.features import Fbank, resample
from moe_asr.data.kaldi_text import read_table
from moe_asr.data.tokenizer import Tokenizer, read_symbol_table
from moe_asr.decode import decode
from moe_asr.run.config import ExperimentConfig
from moe_asr.model.config import DecoderConfig, EncoderConfig, ModelConfig
from moe_asr.model.u2pp import build_model
from moe_asr.moe.config import MoEConfig
from tests.engine.conftest import FSDD, UNITS

KEYS = ["3_jackson_12", "0_george_0", "7_theo_5", "9_nicolas_30", "5_yweweler_2", "1_lucas_7"]
RATE = 16000
KEPT_BINS = 24
CHUNK, LEFT = 4, 2
MARGIN = 0.05


@pytest.fixture(scope="module")
def waves(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """Each utterance at 16 kHz: a float WAV for `moe-asr recognize` and the samples for sherpa-onnx."""
    root = tmp_path_factory.mktemp("wav16k")
    out = {}
    for key in KEYS:
        wave, sr = sf.read(str(FSDD / f"{key}.wav"), dtype="float32")
        samples = resample(torch.from_numpy(wave), sr, RATE).numpy()
        sf.write(str(root / f"{key}.wav"), samples, RATE, subtype="FLOAT")
        out[key] = (root / f"{key}.wav", samples)
    return out


@pytest.fixture(scope="module")
def exported(waves, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("model")
    units = root / "units.txt"
    units.write_text("".join(f"{t} {i}\n" for i, t in enumerate(UNITS)))
    feats = torch.cat(Fbank(FeatureConfig())([torch.from_numpy(s) for _, s in waves.values()])).double()
    (root / "cmvn.json").write_text(json.dumps({"mean_stat": feats.sum(0).tolist(),
                                                "var_stat": feats.square().sum(0).tolist(),
                                                "frame_num": feats.shape[0]}))
    data = DataConfig(tokenizer=TokenizerConfig(symbol_table=str(units)))
    cfg = ModelConfig(vocab_size=len(UNITS), input_dim=80, cmvn=str(root / "cmvn.json"),
                      encoder=EncoderConfig(output_size=32, attention_heads=2, linear_units=48, num_blocks=2,
                                            cnn_module_kernel=5, causal=True),
                      decoder=DecoderConfig(attention_heads=2, linear_units=48, num_blocks=1, r_num_blocks=1),
                      moe=MoEConfig(num_experts=4, top_k=2))
    torch.manual_seed(1)  # a seed whose model says six different things on these six utterances
    model = build_model(cfg)
    with torch.no_grad():
        model.encoder.global_cmvn.istd[KEPT_BINS:] = 0.0
        model.ctc.ctc_lo.weight.mul_(6.0)
        model.ctc.ctc_lo.bias[0] -= 2.0
    tokenizer = Tokenizer(data.tokenizer, read_symbol_table(units))
    model_file = save_model(root / "model.pt", model.state_dict(), ExperimentConfig(model=cfg, data=data), tokenizer)
    out = root / "onnx"
    assert main(["export", "--model", str(model_file), "-o", str(out), "--sherpa-onnx",
                 "--chunk-size", str(CHUNK), "--num-left-chunks", str(LEFT)]) == 0
    return model_file, out / "sherpa-onnx"


def _features() -> sherpa_onnx.FeatureExtractorConfig:
    """Our features as sherpa-onnx's options say them (its defaults: snip_edges False, high_freq -400)."""
    return sherpa_onnx.FeatureExtractorConfig(sampling_rate=RATE, feature_dim=80, low_freq=20.0, high_freq=0.0,
                                              dither=0.0, snip_edges=True)


def _decisive(model: torch.nn.Module, feats: torch.Tensor, streaming: bool) -> bool:
    """Whether every frame's best CTC token wins by > MARGIN (log-prob): a near-tie may flip
    either way on the 0.01 that the two filterbanks differ by."""
    with torch.no_grad():
        lengths = torch.tensor([feats.shape[0]])
        enc, _ = (model.encoder.forward_chunk_by_chunk(feats[None], lengths, CHUNK, LEFT) if streaming
                  else model.encoder(feats[None], lengths, -1, -1))
        top = model.ctc.log_softmax(enc)[0].topk(2, dim=-1).values
    return bool((top[:, 0] - top[:, 1]).min() > MARGIN)


def _text(tokens: list[str], model_file: Path) -> str:
    """sherpa-onnx's token strings as our tokenizer writes them (it drops specials such as <sos/eos>)."""
    tokenizer = load_model(model_file).tokenizer
    return tokenizer.decode([tokenizer.symbol_table[t] for t in tokens])


def test_offline_recognizer_gives_the_transcripts_of_moe_asr_recognize(exported, waves, tmp_path):
    model_file, sherpa_dir = exported
    meta = json.loads((sherpa_dir.parent / "export.json").read_text())["files"]["sherpa-onnx/model.onnx"]
    assert [i["name"] for i in meta["inputs"]] == ["x", "x_lens"]
    assert meta["metadata"]["model_type"] == "wenet_ctc" and meta["metadata"]["subsampling_factor"] == "4"
    out = tmp_path / "rec"
    assert main(["recognize", "--model", str(model_file), "--mode", "ctc_greedy_search", "-o", str(out),
                 *[str(p) for p, _ in waves.values()]]) == 0
    expected = read_table(out / "ctc_greedy_search" / "text")
    rec = sherpa_onnx.OfflineRecognizer.from_wenet_ctc(model=str(sherpa_dir / "model.onnx"),
                                                       tokens=str(sherpa_dir / "tokens.txt"), num_threads=1)
    rec.config.feat_config = _features()
    rec.recognizer = _OfflineImpl(rec.config)
    loaded = load_model(model_file)
    fbank = Fbank(loaded.config.data.features)
    decisive = {k for k, (_, samples) in waves.items()
                if _decisive(loaded.model, fbank([torch.from_numpy(samples)])[0], streaming=False)}
    assert len(decisive) >= 4, decisive
    got = {}
    for key, (_, samples) in waves.items():
        stream = rec.create_stream()
        stream.accept_waveform(RATE, samples)
        rec.decode_stream(stream)
        got[key] = _text(stream.result.tokens, model_file)
    assert {k: got[k] for k in decisive} == {k: expected[k] for k in decisive}
    assert len(set(got.values())) > 3, f"the model should say different things: {got}"


def test_online_recognizer_gives_our_streaming_transcripts(exported, waves):
    """sherpa-onnx decodes whole windows only, as they fill; ours decodes the same windows of our features."""
    model_file, sherpa_dir = exported
    loaded = load_model(model_file)
    rec = sherpa_onnx.OnlineRecognizer.from_wenet_ctc(tokens=str(sherpa_dir / "tokens.txt"),
                                                      model=str(sherpa_dir / "model-streaming.onnx"),
                                                      chunk_size=CHUNK, num_left_chunks=LEFT, num_threads=1)
    rec.config.feat_config = _features()
    rec.recognizer = _OnlineImpl(rec.config)
    w = loaded.model.encoder.stream_windows(CHUNK, LEFT)
    fbank = Fbank(loaded.config.data.features)
    said = set()
    for key, (_, samples) in waves.items():
        stream = rec.create_stream()
        stream.accept_waveform(RATE, samples)
        stream.input_finished()
        chunks = 0
        while rec.is_ready(stream):
            rec.decode_stream(stream)
            chunks += 1
        got = _text(rec.get_result_all(stream).tokens, model_file)
        feats = fbank([torch.from_numpy(samples)])[0][:(chunks - 1) * w.stride + w.window]
        if not _decisive(loaded.model, feats, streaming=True):
            continue
        hyp = decode(loaded.model, feats[None], torch.tensor([feats.shape[0]]), ["ctc_greedy_search"],
                     chunk_size=CHUNK, num_left_chunks=LEFT, streaming=True)["ctc_greedy_search"][0]
        assert got == loaded.tokenizer.decode(hyp.tokens), key
        said.add(got)
    assert len(said) > 3, f"at least four decisive utterances saying different things: {said}"
