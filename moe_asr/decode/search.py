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
from moe_asr.decode.options import DecodeOptions

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
    options: DecodeOptions = DecodeOptions(),
) -> dict[str, list[Hypothesis]]:
    """Decode a batch with each of ``methods`` (names in :data:`METHODS`) under ``options``.

    ``model`` is put in eval mode for the call and restored after; ``feats [B, T, D]``,
    ``feats_lengths [B]``. ``options.streaming`` runs the encoder chunk by chunk with its
    caches (``options.streams`` is the pipeline's business, not this batch's).
    Returns, per method, one :class:`Hypothesis` per utterance.
    """
    check_methods(methods)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _decode(model, feats, feats_lengths, methods, options)
    finally:
        model.train(was_training)


def _decode(
    model: torch.nn.Module,
    feats: torch.Tensor,
    feats_lengths: torch.Tensor,
    methods: Sequence[str],
    o: DecodeOptions,
) -> dict[str, list[Hypothesis]]:
    if o.streaming:
        memory, memory_mask = model.encoder.forward_chunk_by_chunk(
            feats, feats_lengths, o.chunk_size, o.num_left_chunks)
    else:
        memory, memory_mask = model.encode(feats, feats_lengths, o.chunk_size, o.num_left_chunks)
    lengths = memory_mask.squeeze(1).sum(1)
    ctc_logp = model.ctc.log_softmax(memory)

    results: dict[str, tuple[list[list[int]], list[float]]] = {}
    if "ctc_greedy_search" in methods:
        results["ctc_greedy_search"] = ctc_greedy_search(ctc_logp, lengths)
    if {"ctc_prefix_beam_search", "attention_rescoring"} & set(methods):
        nbest = [ctc_prefix_beam_search(ctc_logp[b, :n], o.beam_size)
                 for b, n in enumerate(lengths.tolist())]
        results["ctc_prefix_beam_search"] = ([list(nb[0][0]) for nb in nbest],
                                             [nb[0][1] for nb in nbest])
        if "attention_rescoring" in methods:
            results["attention_rescoring"] = attention_rescoring(
                model.decoder, memory, memory_mask, nbest, model.sos, model.eos,
                o.ctc_weight, effective_reverse_weight(model, o.reverse_weight))
    if "attention" in methods:
        results["attention"] = attention_beam_search(
            model.decoder, memory, memory_mask, model.sos, model.eos, o.beam_size)
    return {m: [Hypothesis(t, s) for t, s in zip(*results[m])] for m in methods}
