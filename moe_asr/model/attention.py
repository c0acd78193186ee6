"""Multi-head attention: plain (decoders) and relative-position (encoder, with a K/V cache)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiHeadedAttention(nn.Module):
    def __init__(self, n_head: int, n_feat: int, dropout: float) -> None:
        super().__init__()
        assert n_feat % n_head == 0
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, linear: nn.Linear, x: Tensor) -> Tensor:
        return linear(x).view(x.shape[0], -1, self.h, self.d_k).transpose(1, 2)

    def attend(self, value: Tensor, scores: Tensor, mask: Tensor | None) -> Tensor:
        """Softmax over keys allowed by ``mask [B, 1 or Tq, Tk]``; rows with no key give 0."""
        if mask is not None:
            allowed = mask.unsqueeze(1)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            attn = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        x = self.dropout(attn) @ value
        return self.linear_out(x.transpose(1, 2).reshape(x.shape[0], -1, self.h * self.d_k))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        q = self._heads(self.linear_q, query)
        k = self._heads(self.linear_k, key)
        v = self._heads(self.linear_v, value)
        return self.attend(v, q @ k.transpose(-2, -1) / math.sqrt(self.d_k), mask)


class RelPositionMultiHeadedAttention(MultiHeadedAttention):
    """Transformer-XL attention: content term plus a position term.

    ``shift``: the position term scores the distance ``i - j`` (``pos_emb``
    per distance, see ``RelPositionalEncoding``); without it, WeNet's variant,
    it scores each key's own encoding (``pos_emb`` per key, ``[1 or B, k, d]``:
    per stream when the streams of a batch are at different positions).
    ``cache [B, h, T_cache, 2 * d_k]`` holds keys and values of earlier frames;
    the new cache (cache + this chunk) is returned for the caller to trim.
    """

    def __init__(self, n_head: int, n_feat: int, dropout: float, shift: bool = True) -> None:
        super().__init__(n_head, n_feat, dropout)
        self.shift = shift
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, x: Tensor, mask: Tensor | None, pos_emb: Tensor,  # type: ignore[override]
                cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        q = self._heads(self.linear_q, x)
        k = self._heads(self.linear_k, x)
        v = self._heads(self.linear_v, x)
        if cache is not None and cache.shape[2] > 0:
            k_cache, v_cache = cache.split(self.d_k, dim=-1)
            k, v = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
        new_cache = torch.cat([k, v], dim=-1)
        p = self.linear_pos(pos_emb).view(pos_emb.shape[0], -1, self.h, self.d_k).transpose(1, 2)
        content = (q + self.pos_bias_u.unsqueeze(1)) @ k.transpose(-2, -1)
        position = (q + self.pos_bias_v.unsqueeze(1)) @ p.transpose(-2, -1)
        if self.shift:
            position = rel_shift(position, k.shape[2])
        return self.attend(v, (content + position) / math.sqrt(self.d_k), mask), new_cache


def rel_shift(x: Tensor, k_len: int) -> Tensor:
    """``[B, h, Tq, Tk + Tq - 1]`` scores per distance -> ``[B, h, Tq, Tk]`` per key.

    Column c of ``x`` is distance ``Tk - 1 - c``; query i (the i-th of the last
    Tq keys) and key j are ``Tk - Tq + i - j`` apart, i.e. column
    ``Tq - 1 - i + j``. Padding each row by one and re-viewing the flat buffer
    with a row stride one shorter shifts row i left by i, for all rows at once.
    """
    b, h, q, p = x.shape
    flat = F.pad(x, (0, 1)).view(b, h, q * (p + 1))
    return flat[..., q - 1:q - 1 + q * p].view(b, h, q, p)[..., :k_len]
