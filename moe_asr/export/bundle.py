"""Every graph of a model into one folder, with ``export.json`` describing each file from the file itself."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_asr.export import sherpa
from moe_asr.export.graphs import EncoderCTC, RescoringDecoder, StreamingEncoder
from moe_asr.export.moe import sparse_copy
from moe_asr.export.onnx_io import describe, save_graph
from moe_asr.export.quantize import quantize_graph
from moe_asr.model.u2pp import U2PPModel

DESCRIPTION = "export.json"


def _feats_example(model: U2PPModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Two utterances, the second padded: long enough for any subsampling's receptive field."""
    return torch.randn(2, 100, model.cfg.input_dim), torch.tensor([100, 73])


def _export_encoder(model: U2PPModel, out: Path, opset: int) -> Path:
    return save_graph(EncoderCTC(model), _feats_example(model), out / "encoder_ctc.onnx",
                      {"feats": ("B", "T", model.cfg.input_dim), "feats_lengths": ("B",)},
                      {"ctc_log_probs": ("B", "T_out", model.vocab_size), "encoder_out_lens": ("B",),
                       "encoder_out": ("B", "T_out", model.encoder.output_size)}, opset)


def _export_streaming(model: U2PPModel, out: Path, chunk_size: int, num_left_chunks: int, opset: int) -> Path:
    graph = StreamingEncoder(model, chunk_size, num_left_chunks)
    _, _, att, cnn = graph.initial_state(1)
    cache = ("layers", "B", att.shape[2], graph.windows.required_cache_size, att.shape[4])
    conv = ("layers", "B", *cnn.shape[2:])
    state = {"offset": ("B",), "cache_mask": ("B", graph.windows.required_cache_size), "att_cache": cache,
             "cnn_cache": conv}
    return save_graph(graph, graph.example(2), out / "streaming_encoder.onnx",
                      {"chunk": ("B", "W", model.cfg.input_dim), "chunk_lengths": ("B",), **state},
                      {"ctc_log_probs": ("B", "C", model.vocab_size),
                       "encoder_out": ("B", "C", model.encoder.output_size), "encoder_out_lens": ("B",),
                       **{f"next_{k}": v for k, v in state.items()}}, opset,
                      {"chunk_size": chunk_size, "num_left_chunks": num_left_chunks,
                       "window": graph.windows.window, "stride": graph.windows.stride})


def _export_decoders(model: U2PPModel, out: Path, opset: int) -> list[Path]:
    d = model.encoder.output_size
    example = (torch.randn(2, 20, d), torch.tensor([20, 13]), torch.full((2, 6), model.sos), torch.tensor([6, 4]))
    inputs = {"encoder_out": ("B", "T", d), "encoder_out_lens": ("B",), "ys_in": ("B", "U"), "ys_in_lens": ("B",)}
    decoders = {"l2r": model.decoder.left_decoder, "r2l": model.decoder.right_decoder}
    return [save_graph(RescoringDecoder(dec), example, out / f"decoder_{name}.onnx", inputs,
                       {"log_probs": ("B", "U", model.vocab_size)}, opset, {"sos_eos": model.sos})
            for name, dec in decoders.items() if dec is not None]


def _export_sherpa(model: U2PPModel, out: Path, chunk_size: int, num_left_chunks: int, opset: int,
                   opts: sherpa.SherpaOptions, int8: bool) -> list[Path]:
    out.mkdir(exist_ok=True)
    dim = model.cfg.input_dim
    if opts.log_floor is not None and opts.log_floor.shape != (dim,):
        raise ValueError(f"the feature floor has {tuple(opts.log_floor.shape)} bins, the model takes {dim}")
    tokens = out / "tokens.txt"
    tokens.write_text(sherpa.tokens_txt(opts), encoding="utf-8")
    files = [save_graph(sherpa.floored(sherpa.offline_graph(model), opts.log_floor), _feats_example(model),
                        out / "model.onnx", {"x": ("N", "T", dim), "x_lens": ("N",)},
                        {"log_probs": ("N", "T_out", model.vocab_size), "log_probs_lens": ("N",)}, opset,
                        sherpa.offline_metadata(model))]
    if model.cfg.encoder.causal:
        graph = sherpa.SherpaStreaming(model, chunk_size, num_left_chunks)
        example = graph.example()
        files.append(save_graph(
            sherpa.floored(graph, opts.log_floor), example, out / "model-streaming.onnx",
            {"x": (1, "W", dim), "offset": (1,), "required_cache_size": (1,),
             "attn_cache": tuple(example[3].shape), "conv_cache": tuple(example[4].shape),
             "attn_mask": tuple(example[5].shape)},
            {"log_probs": (1, "C", model.vocab_size), "next_att_cache": tuple(example[3].shape),
             "next_conv_cache": tuple(example[4].shape)}, opset,
            sherpa.streaming_metadata(model, chunk_size, num_left_chunks)))
    script = out / "decode.py"
    tail = model.encoder.stream_windows(chunk_size, num_left_chunks).window if model.cfg.encoder.causal else 0
    script.write_text(sherpa.decode_script(opts, dim, chunk_size, num_left_chunks, model.cfg.encoder.causal, int8,
                                           tail))
    script.chmod(0o755)
    return [*files, tokens, script]


def int8_path(path: Path) -> Path:
    """Where the int8 twin of the graph ``path`` goes: ``model.onnx`` -> ``model.int8.onnx`` (sherpa-onnx's name)."""
    return path.with_name(f"{path.stem}.int8.onnx")


def export_model(model: U2PPModel, out_dir: str | Path, chunk_size: int = 16, num_left_chunks: int = 4,
                 opset: int = 17, sherpa_onnx: sherpa.SherpaOptions | None = None, about: dict | None = None,
                 int8: bool = False) -> dict:
    """Write every graph of ``model`` under ``out_dir`` (with ``sherpa_onnx``: also the sherpa-onnx
    files under ``sherpa-onnx/``; with ``int8``: beside each graph its int8 twin, ``*.int8.onnx``)
    and ``export.json`` (with ``about``, e.g. the model's source and features, in front); returns
    what ``export.json`` holds.

    The streaming graphs need a causal encoder; for a full-context model they are left out
    and ``export.json`` says why.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = sparse_copy(model)
    files = [_export_encoder(model, out, opset)]
    skipped = {}
    if model.cfg.encoder.causal:
        files.append(_export_streaming(model, out, chunk_size, num_left_chunks, opset))
    else:
        skipped["streaming"] = "the encoder is not causal (encoder.causal: false): it cannot stream"
    files += _export_decoders(model, out, opset)
    if sherpa_onnx is not None:
        files += _export_sherpa(model, out / "sherpa-onnx", chunk_size, num_left_chunks, opset, sherpa_onnx, int8)
    if int8:
        files += [quantize_graph(f, int8_path(f)) for f in files if f.suffix == ".onnx"]
    summary = {**(about or {}), "opset": opset, "chunk_size": chunk_size, "num_left_chunks": num_left_chunks,
               "files": {str(f.relative_to(out)): describe(f) for f in files if f.suffix == ".onnx"},
               "skipped": skipped}
    (out / DESCRIPTION).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
