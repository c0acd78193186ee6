"""Files for sherpa-onnx's WeNet CTC model type: graphs in its input/output order with its
metadata keys, ``tokens.txt`` as it joins tokens, and a script that runs them with the model's features.

sherpa-onnx (``OfflineRecognizer.from_wenet_ctc``, ``OnlineRecognizer.from_wenet_ctc``)
runs a file's inputs in order and reads its metadata:

- offline: ``x [N, T, F]``, ``x_lens [N]`` -> ``log_probs [N, T', V]``,
  ``log_probs_lens [N]``; metadata ``model_type=wenet_ctc``, ``vocab_size``,
  ``subsampling_factor``.
- streaming (one stream): ``x [1, W, F]``, ``offset [1]``,
  ``required_cache_size [1]``, ``attn_cache [blocks, head, R, 2 d_k]``,
  ``conv_cache [blocks, 1, d, kernel - 1]``, ``attn_mask [1, 1, R + chunk]``
  -> ``log_probs [1, chunk, V]``, next ``attn_cache``, next ``conv_cache``;
  metadata also ``head``, ``num_blocks``, ``output_size``,
  ``cnn_module_kernel``, ``right_context`` (and, for people, ``chunk_size``,
  ``left_chunks``). The runtime starts ``offset`` at ``R = chunk_size *
  num_left_chunks`` (from its own config, which must equal the exported one)
  and masks the cache columns not yet filled; our graph's offset is
  ``offset - required_cache_size``.

sherpa-onnx computes the fbank itself. Its public constructors take only the
sample rate and the number of mel bins; its other options are Kaldi's except
``snip_edges=False``, ``high_freq=-400`` (``SHERPA_FBANK``), and its offline
WeNet CTC recognizer always dithers (one 16-bit step). A model whose features
floor the mel bins above that dither (``FeatureConfig.mel_floor_db``) gets the
floor inside its graphs, since sherpa-onnx's features have none.
"""
from __future__ import annotations

import string
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from moe_asr.export.graphs import EncoderCTC, StreamingEncoder
from moe_asr.model.u2pp import U2PPModel

# The fbank options of sherpa-onnx's FeatureExtractorConfig that its from_wenet_ctc leaves at these values,
# and Kaldi's (FeatureConfig's defaults).
SHERPA_FBANK = {"low_freq": 20.0, "high_freq": -400.0, "snip_edges": False}
KALDI_FBANK = {"low_freq": 20.0, "high_freq": 0.0, "snip_edges": True}
# sentencepiece's word start: sherpa-onnx prints a token's leading one as a space.
WORD_START = "\u2581"


@dataclass
class SherpaOptions:
    """What the sherpa-onnx files need beside the model: its tokens and its features."""

    symbol_table: dict[str, int]
    # The units are whole words (tokenizer type `word`): each is written as a word start.
    word_units: bool = False
    # Tokens never marked as a word start (the CTC blank, which sherpa-onnx finds by name, and <sos/eos>).
    unmarked: Collection[str] = ()
    sample_rate: int = 16000
    # The model's values of the options in SHERPA_FBANK.
    fbank: dict[str, float | bool] = field(default_factory=lambda: dict(KALDI_FBANK))
    # The model's floor per mel bin on log-mel features (FeatureConfig.mel_floor_db), if any.
    log_floor: Optional[Tensor] = None


def tokens_txt(opts: SherpaOptions) -> str:
    """``token id`` lines. sherpa-onnx writes a result's tokens one after the other, a leading ▁ as a
    space: characters and sentencepiece pieces (▁ where a word starts) read as our tokenizer joins
    them, and whole words get a ▁ each, so that they are printed apart as we print them."""
    def name(token: str) -> str:
        return WORD_START + token if opts.word_units and token not in opts.unmarked else token
    return "".join(f"{name(t)} {i}\n" for t, i in sorted(opts.symbol_table.items(), key=lambda kv: kv[1]))


class Floored(nn.Module):
    """``graph`` with its first input (log-mel features) raised to ``log_floor`` per bin first: the
    model's own features carry that floor (unchanged by it), sherpa-onnx's do not."""

    def __init__(self, graph: nn.Module, log_floor: Tensor) -> None:
        super().__init__()
        self.graph = graph
        self.register_buffer("log_floor", log_floor.float())

    def forward(self, x: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        return self.graph(torch.maximum(x, self.log_floor), *rest)


def floored(graph: nn.Module, log_floor: Optional[Tensor]) -> nn.Module:
    return graph if log_floor is None else Floored(graph, log_floor)


def offline_graph(model: U2PPModel) -> EncoderCTC:
    return EncoderCTC(model, with_encoder_out=False)


class SherpaStreaming(nn.Module):
    """``StreamingEncoder`` for one stream in the runtime's layout (no batch axis in ``attn_cache``)."""

    def __init__(self, model: U2PPModel, chunk_size: int, num_left_chunks: int) -> None:
        super().__init__()
        if not model.cfg.encoder.use_cnn_module:
            raise ValueError("sherpa-onnx's WeNet streaming model needs the convolution module (its conv_cache)")
        self.stream = StreamingEncoder(model, chunk_size, num_left_chunks)

    def example(self) -> tuple[Tensor, ...]:
        """Inputs as the runtime builds them for the first chunk."""
        w = self.stream.windows
        r = w.required_cache_size
        _, _, att, cnn = self.stream.initial_state(1)
        mask = torch.ones(1, 1, r + self.stream.chunk_size, dtype=torch.bool)
        mask[:, :, :r] = False
        size = torch.tensor([r])
        return (torch.zeros(1, w.window, self.stream.input_dim), size.clone(), size, att.squeeze(1), cnn,
                mask)

    def forward(self, x: Tensor, offset: Tensor, required_cache_size: Tensor, attn_cache: Tensor,
                conv_cache: Tensor, attn_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lengths = offset.new_ones(x.shape[0]) * x.shape[1]
        cache_mask = attn_mask[:, 0, :attn_cache.shape[2]]
        log_probs, _, _, _, _, att, cnn = self.stream(x, lengths, offset - required_cache_size, cache_mask,
                                                      attn_cache.unsqueeze(1), conv_cache)
        return log_probs, att.squeeze(1), cnn


def offline_metadata(model: U2PPModel) -> dict[str, str | int]:
    return {"model_type": "wenet_ctc", "version": "1", "model_author": "moe-asr", "comment": "non-streaming",
            "vocab_size": model.vocab_size, "subsampling_factor": model.encoder.embed.rate}


def streaming_metadata(model: U2PPModel, chunk_size: int, num_left_chunks: int) -> dict[str, str | int]:
    enc = model.encoder.cfg
    return {**offline_metadata(model), "comment": "streaming", "chunk_size": chunk_size,
            "left_chunks": num_left_chunks, "head": enc.attention_heads, "num_blocks": enc.num_blocks,
            "output_size": enc.output_size, "cnn_module_kernel": enc.cnn_module_kernel,
            "right_context": model.encoder.embed.right_context}


_SCRIPT = string.Template('''#!/usr/bin/env python3
"""Decode WAV files (16-bit PCM) with sherpa-onnx; written by `moe-asr export --sherpa-onnx`.

    python decode.py a.wav b.wav          model.onnx, whole utterances
    python decode.py --streaming a.wav    model-streaming.onnx, chunk by chunk
    python decode.py --int8 a.wav         the int8 graphs (model.int8.onnx, ...), if exported

Prints `name text` a line. sherpa-onnx computes the model's fbank itself: $rate Hz,
$dim mel bins$fbank_note. Audio at another rate is resampled by sherpa-onnx.
"""
import argparse
import wave
from pathlib import Path

import numpy as np
import sherpa_onnx

HERE = Path(__file__).resolve().parent
SAMPLE_RATE, FEATURE_DIM = $rate, $dim
CHUNK_SIZE, NUM_LEFT_CHUNKS = $chunk_size, $num_left_chunks
# Silence appended before the end of a streamed file: sherpa-onnx's online recognizer runs whole chunks
# only, so without it the last partial chunk (a whole short utterance) is never decoded. One chunk's window.
TAIL_SECONDS = $tail_seconds
STREAMING = $streaming
INT8 = $int8  # written with `moe-asr export --int8`
# The model's fbank options that from_wenet_ctc does not take (empty: sherpa-onnx's defaults are the model's).
FBANK = $fbank


def recognizer(streaming: bool, int8: bool = False):
    if int8 and not INT8:
        raise SystemExit("this export has no int8 graphs: export with --int8")
    suffix = ".int8.onnx" if int8 else ".onnx"
    if streaming:
        if not STREAMING:
            raise SystemExit("this model has no streaming graph: its encoder is not causal")
        rec = sherpa_onnx.OnlineRecognizer.from_wenet_ctc(
            tokens=str(HERE / "tokens.txt"), model=str(HERE / f"model-streaming{suffix}"), chunk_size=CHUNK_SIZE,
            num_left_chunks=NUM_LEFT_CHUNKS, num_threads=1, sample_rate=SAMPLE_RATE, feature_dim=FEATURE_DIM)
    else:
        rec = sherpa_onnx.OfflineRecognizer.from_wenet_ctc(
            model=str(HERE / f"model{suffix}"), tokens=str(HERE / "tokens.txt"), num_threads=1,
            sample_rate=SAMPLE_RATE, feature_dim=FEATURE_DIM)
    if FBANK:
        # Only sherpa-onnx's own recognizer class (not a public one) takes the other fbank options.
        rec.config.feat_config = sherpa_onnx.FeatureExtractorConfig(
            sampling_rate=SAMPLE_RATE, feature_dim=FEATURE_DIM, **FBANK)
        rec.recognizer = type(rec.recognizer)(rec.config)
    return rec


def read(path: str):
    with wave.open(path) as f:
        if f.getsampwidth() != 2:
            raise SystemExit(f"{path}: not 16-bit PCM")
        samples = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").reshape(-1, f.getnchannels())
        return f.getframerate(), samples[:, 0].astype(np.float32) / 32768


def main() -> None:
    parser = argparse.ArgumentParser(description="Decode WAV files with sherpa-onnx")
    parser.add_argument("--streaming", action="store_true", help="model-streaming.onnx, chunk by chunk")
    parser.add_argument("--int8", action="store_true", help="the int8 graphs (*.int8.onnx)")
    parser.add_argument("wavs", nargs="+")
    args = parser.parse_args()
    rec = recognizer(args.streaming, args.int8)
    for path in args.wavs:
        rate, samples = read(path)
        stream = rec.create_stream()
        stream.accept_waveform(rate, samples)
        if args.streaming:
            stream.accept_waveform(rate, np.zeros(int(TAIL_SECONDS * rate), dtype=np.float32))
            stream.input_finished()
            while rec.is_ready(stream):
                rec.decode_stream(stream)
            text = rec.get_result(stream)
        else:
            rec.decode_stream(stream)
            text = stream.result.text.strip()
        print(Path(path).stem, text)


if __name__ == "__main__":
    main()
''')


def decode_script(opts: SherpaOptions, feature_dim: int, chunk_size: int, num_left_chunks: int,
                  streaming: bool, int8: bool = False, tail_frames: int = 0) -> str:
    """``decode.py``: sherpa-onnx's recognizers on the exported files, with the model's rate, bins and fbank;
    ``tail_frames``: feature frames of silence it appends to a streamed file (10 ms each, sherpa-onnx's shift)."""
    fbank = {k: v for k, v in opts.fbank.items() if v != SHERPA_FBANK[k]}
    note = "".join(f", {k}={v}" for k, v in opts.fbank.items())
    return _SCRIPT.substitute(rate=opts.sample_rate, dim=feature_dim, fbank_note=note, chunk_size=chunk_size,
                              num_left_chunks=num_left_chunks, streaming=streaming, int8=int8,
                              fbank=repr(fbank), tail_seconds=round(tail_frames * 0.01, 4))
