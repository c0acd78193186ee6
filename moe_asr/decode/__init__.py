"""Decoding: CTC greedy / prefix beam search, attention beam search and rescoring.

``decode`` is the one entry point for the recipe and the CLI; the algorithms in
``ctc`` and ``attention`` take plain tensors and a decoder, for reuse and tests;
``streaming.StreamingRecognizer`` decodes many live streams chunk by chunk;
``scoring`` needs no torch.

The names below load ``search`` (and torch) on first use, so that ``moe-asr
score``, which only needs ``scoring``, starts without importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["METHODS", "Hypothesis", "decode"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("moe_asr.decode.search"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
