"""Sinusoidal position encodings: absolute for the decoders, for the encoder's attention either.

By default the encoder's attention uses true relative positions (Transformer-XL
style): the score of query i and key j depends on ``i - j`` only, so a chunk
attending to its cache sees the encodings a full-utterance forward would,
whatever the absolute offset. WeNet's attention drops the shift and scores the
absolute position of each key instead (``encoder.rel_pos_shift: false``); then
streaming equals full context because a chunk's keys (cache + chunk) get the
encodings of their absolute positions.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoid(positions: Tensor, d_model: int) -> Tensor:
    """``[P] -> [P, d_model]``: sin on even dims, cos on odd dims."""
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    angles = positions.float().unsqueeze(1) * div.to(positions.device)
    pe = torch.empty(positions.numel(), d_model, device=positions.device)
    pe[:, 0::2] = angles.sin()
    pe[:, 1::2] = angles.cos()
    return pe


class PositionalEncoding(nn.Module):
    """``x * sqrt(d) + pe[offset : offset + T]`` (decoder token embeddings)."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        pos = torch.arange(offset, offset + x.shape[1], device=x.device)
        return self.dropout(x * math.sqrt(self.d_model) + sinusoid(pos, self.d_model).to(x.dtype))


class RelPositionalEncoding(nn.Module):
    """Scales the input by sqrt(d) and gives the encodings the encoder's attention scores.

    For ``q_len`` queries that are the last ``q_len`` of ``k_len = cache_len +
    q_len`` keys: with ``shift`` the distances ``i - j`` from ``k_len - 1`` down
    to ``-(q_len - 1)``, ``[1, k_len + q_len - 1, d]``, the same for every
    stream; without, the keys' absolute positions ``offset - cache_len ..
    offset + q_len - 1``, where ``offset`` is the first query's position:
    ``[B, k_len, d]`` for per-stream ``offset [B]`` (streams at different
    positions in one batch), ``[1, k_len, d]`` from position 0 when it is None.
    """

    def __init__(self, d_model: int, dropout: float, shift: bool = True) -> None:
        super().__init__()
        self.d_model = d_model
        self.shift = shift
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache_len: int = 0, offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        q_len = x.shape[1]
        if self.shift:
            pos = torch.arange(cache_len + q_len - 1, -q_len, -1, device=x.device).unsqueeze(0)
        else:
            start = torch.zeros(1, dtype=torch.long, device=x.device) if offset is None else offset
            pos = (start - cache_len).unsqueeze(1) + torch.arange(cache_len + q_len, device=x.device)
        pos_emb = sinusoid(pos.flatten(), self.d_model).to(x.dtype).view(*pos.shape, self.d_model)
        return self.dropout(x * math.sqrt(self.d_model)), self.dropout(pos_emb)
