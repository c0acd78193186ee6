"""Export a trained model to ONNX, MoE layers kept sparse; optionally for sherpa-onnx too.

Writes under OUTDIR:

  encoder_ctc.onnx          full-context encoder + CTC on padded batches
  streaming_encoder.onnx    one chunk of a batch of streams, fixed-size caches in and out
                            (causal encoders only)
  decoder_l2r.onnx, decoder_r2l.onnx
                            the attention decoders, teacher-forced, for rescoring
  sherpa-onnx/              with --sherpa-onnx: model.onnx (offline), model-streaming.onnx
                            (causal encoders), tokens.txt, for sherpa-onnx's WeNet CTC model type,
                            and decode.py, which runs them with the model's rate, bins and fbank
  *.int8.onnx               with --int8: each graph's int8 twin (dynamic quantization, experts
                            included, routers float, still sparse), sherpa-onnx's too
  export.json               every file's inputs, outputs (axes) and metadata, the model's features

Every MoE layer stays sparse, in standard ONNX ops (only the top-k experts of
each token run); CMVN is inside the graphs, the features (fbank) are not.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from moe_asr import symbols
from moe_asr.checkpoint import LoadedModel, load_model
from moe_asr.data.features import Fbank
from moe_asr.export import DESCRIPTION, SherpaOptions, export_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model file, run directory, checkpoints directory or checkpoint tag directory")
    parser.add_argument("--tag", help="checkpoint tag of a run directory (default: its latest)")
    parser.add_argument("-o", "--out-dir", required=True, help="output folder")
    parser.add_argument("--sherpa-onnx", action="store_true",
                        help="also write sherpa-onnx WeNet CTC files (offline and streaming), tokens.txt and decode.py")
    parser.add_argument("--int8", action="store_true",
                        help="also write each graph's int8 twin (*.int8.onnx): int8 weights, experts included")
    parser.add_argument("--chunk-size", type=int, default=16,
                        help="streaming chunk in encoder frames (default 16)")
    parser.add_argument("--num-left-chunks", type=int, default=4,
                        help="left chunks each streaming chunk sees, >= 0: the cache size (default 4)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")


def _check_options(args: argparse.Namespace) -> None:
    if args.chunk_size < 1:
        raise ValueError("--chunk-size must be >= 1")
    if args.num_left_chunks < 0:
        raise ValueError("--num-left-chunks must be >= 0: a streaming graph keeps a fixed-size cache")
    if args.opset < 17:
        raise ValueError("--opset must be >= 17 (LayerNormalization)")


def _sherpa_options(loaded: LoadedModel) -> SherpaOptions:
    """The tokens and features of the model as sherpa-onnx's files need them."""
    feats = loaded.config.data.features
    if feats.num_mel_bins != loaded.model.cfg.input_dim:
        raise ValueError(f"{loaded.source}: data.features.num_mel_bins ({feats.num_mel_bins}) is not "
                         f"model.input_dim ({loaded.model.cfg.input_dim})")
    return SherpaOptions(loaded.tokenizer.symbol_table, word_units=loaded.tokenizer.cfg.type == "word",
                         unmarked=(symbols.BLANK, symbols.SOS_EOS), sample_rate=feats.sample_rate,
                         fbank={"low_freq": feats.low_freq, "high_freq": feats.high_freq,
                                "snip_edges": feats.snip_edges},
                         log_floor=Fbank(feats).log_floor)


def run(args: argparse.Namespace) -> int:
    try:
        _check_options(args)
        loaded = load_model(args.model, args.tag)
        sherpa_onnx = _sherpa_options(loaded) if args.sherpa_onnx else None
    except (OSError, ValueError) as e:
        print(f"moe-asr export: error: {e}", file=sys.stderr)
        return 1
    about = {"model": str(loaded.source), "features": dataclasses.asdict(loaded.config.data.features)}
    summary = export_model(loaded.model, args.out_dir, args.chunk_size, args.num_left_chunks, args.opset,
                           sherpa_onnx, about, args.int8)
    print(json.dumps({"out_dir": args.out_dir, "description": DESCRIPTION, "files": sorted(summary["files"]),
                      "skipped": summary["skipped"]}, indent=2))
    return 0
