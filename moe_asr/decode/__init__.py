"""Decoding: CTC greedy / prefix beam search, attention beam search and rescoring.

``decode`` is the one entry point for a batch, under one ``DecodeOptions``
(``options.py``: chunking, streaming, search, validated once); the algorithms in
``ctc`` and ``attention`` take plain tensors and a decoder, for reuse and tests;
``streaming.StreamingRecognizer`` decodes many live streams chunk by chunk;
``scoring`` needs no torch.

The names below load ``search`` (and torch) on first use, so that ``moe-asr
score``, which only needs ``scoring``, starts without importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from moe_asr.decode.options import DecodeOptions

__all__ = ["METHODS", "DecodeOptions", "Hypothesis", "decode"]
_SEARCH = ("METHODS", "Hypothesis", "decode")


def __getattr__(name: str) -> Any:
    if name in _SEARCH:
        return getattr(importlib.import_module("moe_asr.decode.search"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
