"""One Transformer decoder layer: causal self-attention, attention over the encoder, MoE FFN."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_asr.model.attention import MultiHeadedAttention
from moe_asr.moe.layer import MoEFeedForward


class DecoderLayer(nn.Module):
    def __init__(self, size: int, self_attn: MultiHeadedAttention, src_attn: MultiHeadedAttention,
                 feed_forward: MoEFeedForward, dropout: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.src_attn = src_attn
        self.feed_forward = feed_forward
        self.norm1 = nn.LayerNorm(size, eps=1e-5)
        self.norm2 = nn.LayerNorm(size, eps=1e-5)
        self.norm3 = nn.LayerNorm(size, eps=1e-5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, tgt_mask: Tensor, memory: Tensor, memory_mask: Tensor,
                cache: Tensor | None = None) -> Tensor:
        """``cache [N, u - 1, d]``: this layer's outputs for the prefix, so only the last
        position is computed (incremental beam search); the full ``[N, u, d]`` is returned."""
        normed = self.norm1(tgt)
        query, residual, query_mask = normed, tgt, tgt_mask
        if cache is not None:
            query, residual, query_mask = normed[:, -1:], tgt[:, -1:], tgt_mask[:, -1:]
        x = residual + self.dropout(self.self_attn(query, normed, normed, query_mask))
        x = x + self.dropout(self.src_attn(self.norm2(x), memory, memory, memory_mask))
        # A padded position cannot see itself; those rows skip the MoE.
        valid = query_mask.diagonal(dim1=-2, dim2=-1) if cache is None else None
        x = x + self.dropout(self.feed_forward(self.norm3(x), valid))
        return x if cache is None else torch.cat([cache, x], dim=1)
