"""One entry point for every decoding method, so the recipe and the CLI share it.

The encoder runs once per batch and its output feeds every requested method; the CTC
prefix beam search runs once and serves both ``ctc_prefix_beam_search`` and
``attention_rescoring``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from moe_asr.decode.attention import attention_beam_search, attention_rescoring
from moe_asr.decode.ctc import ctc_greedy_search, ctc_prefix_beam_search

METHODS = ("ctc_greedy_search", "ctc_prefix_beam_search", "attention", "attention_rescoring")


@dataclass
class Hypothesis:
    """A decoded utterance: token ids (no blank, sos or eos) and the method's score."""

    tokens: list[int]
    score: float


def effective_reverse_weight(model: torch.nn.Module, reverse_weight: float) -> float:
    """0 for a model without an R2L decoder (``r_num_blocks: 0``), so one set of decoding
    arguments serves models with and without it."""
    return reverse_weight if getattr(model.decoder, "right_decoder", None) is not None else 0.0


def check_methods(methods: Sequence[str]) -> None:
    """Refuse names that are not in :data:`METHODS`, naming them."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown decoding method(s) {unknown}; choose from {list(METHODS)}")


def decode(
    model: torch.nn.Module,
    feats: torch.Tensor,
    feats_lengths: torch.Tensor,
    methods: Sequence[str],
    beam_size: int = 10,
    chunk_size: int = -1,
    num_left_chunks: int = -1,
    ctc_weight: float = 0.3,
    reverse_weight: float = 0.5,
    streaming: bool = False,
) -> dict[str, list[Hypothesis]]:
    """Decode a batch with each of ``methods`` (names in :data:`METHODS`).

    Args:
        model: the U2++ model; put in eval mode for the call and restored after.
        feats: ``[B, T, 80]`` features; feats_lengths: ``[B]``.
        beam_size: beam of the prefix beam search (also the rescoring n-best size)
            and of the attention beam search.
        chunk_size: encoder chunk size in frames after subsampling; -1 is full context.
            0 is refused: to the encoder it means "draw a chunk as in training".
        num_left_chunks: chunks of left context the encoder sees; -1 is all.
        ctc_weight: weight of the CTC score in attention rescoring.
        reverse_weight: weight of the R2L decoder in attention rescoring; treated
            as 0 when the model has no R2L decoder (``r_num_blocks: 0``), so one set
            of decoding arguments serves models with and without it.
        streaming: run the encoder chunk by chunk with its caches, as a streaming
            server would, instead of one masked full-utterance pass; needs
            ``chunk_size > 0``.

    Returns:
        Per method, one :class:`Hypothesis` per utterance.
    """
    check_methods(methods)
    if chunk_size == 0:
        raise ValueError("chunk_size must be > 0 (chunked) or -1 (full context), got 0")
    if streaming and chunk_size < 0:
        raise ValueError(f"streaming decoding needs chunk_size > 0, got {chunk_size}")
    reverse_weight = effective_reverse_weight(model, reverse_weight)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _decode(model, feats, feats_lengths, methods, beam_size, chunk_size,
                           num_left_chunks, ctc_weight, reverse_weight, streaming)
    finally:
        model.train(was_training)


def _decode(
    model: torch.nn.Module,
    feats: torch.Tensor,
    feats_lengths: torch.Tensor,
    methods: Sequence[str],
    beam_size: int,
    chunk_size: int,
    num_left_chunks: int,
    ctc_weight: float,
    reverse_weight: float,
    streaming: bool,
) -> dict[str, list[Hypothesis]]:
    if streaming:
        memory, memory_mask = model.encoder.forward_chunk_by_chunk(
            feats, feats_lengths, chunk_size, num_left_chunks)
    else:
        memory, memory_mask = model.encode(feats, feats_lengths, chunk_size, num_left_chunks)
    lengths = memory_mask.squeeze(1).sum(1)
    ctc_logp = model.ctc.log_softmax(memory)

    results: dict[str, tuple[list[list[int]], list[float]]] = {}
    if "ctc_greedy_search" in methods:
        results["ctc_greedy_search"] = ctc_greedy_search(ctc_logp, lengths)
    if {"ctc_prefix_beam_search", "attention_rescoring"} & set(methods):
        nbest = [ctc_prefix_beam_search(ctc_logp[b, :n], beam_size)
                 for b, n in enumerate(lengths.tolist())]
        results["ctc_prefix_beam_search"] = ([list(nb[0][0]) for nb in nbest],
                                             [nb[0][1] for nb in nbest])
        if "attention_rescoring" in methods:
            results["attention_rescoring"] = attention_rescoring(
                model.decoder, memory, memory_mask, nbest, model.sos, model.eos,
                ctc_weight, reverse_weight)
    if "attention" in methods:
        results["attention"] = attention_beam_search(
            model.decoder, memory, memory_mask, model.sos, model.eos, beam_size)
    return {m: [Hypothesis(t, s) for t, s in zip(*results[m])] for m in methods}
