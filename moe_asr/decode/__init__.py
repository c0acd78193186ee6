"""Decoding: CTC greedy / prefix beam search, attention beam search and rescoring.

``decode`` is the one entry point for the recipe and the CLI; the algorithms in
``ctc`` and ``attention`` take plain tensors and a decoder, for reuse and tests;
``streaming.StreamingRecognizer`` decodes many live streams chunk by chunk.
"""
from moe_asr.decode.search import METHODS, Hypothesis, decode

__all__ = ["METHODS", "Hypothesis", "decode"]
