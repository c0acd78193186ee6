"""Sinusoidal position encodings: absolute for the decoders, relative for the encoder.

The encoder's attention uses true relative positions (Transformer-XL style): the
score of query i and key j depends on ``i - j`` only. A chunk attending to its
cache then sees exactly the encodings a full-utterance forward would, whatever
the absolute offset, which is what makes streaming equal full context.
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
    """Scales the input by sqrt(d) and gives encodings of relative distances.

    For ``q_len`` queries that are the last ``q_len`` of ``k_len`` keys, the
    distances ``i - j`` run from ``k_len - 1`` down to ``-(q_len - 1)``: the
    returned ``[1, k_len + q_len - 1, d]`` lists them in that order.
    """

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache_len: int = 0) -> tuple[Tensor, Tensor]:
        q_len = x.shape[1]
        k_len = cache_len + q_len
        dist = torch.arange(k_len - 1, -q_len, -1, device=x.device)
        pos_emb = sinusoid(dist, self.d_model).to(x.dtype).unsqueeze(0)
        return self.dropout(x * math.sqrt(self.d_model)), self.dropout(pos_emb)
