"""Attention decoders: left-to-right, and the U2++ pair (L2R + R2L) sharing one encoder."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_asr.model.attention import MultiHeadedAttention
from moe_asr.model.config import DecoderConfig
from moe_asr.model.decoder_layer import DecoderLayer
from moe_asr.model.ffn import build_ffn
from moe_asr.model.masks import make_pad_mask, subsequent_mask
from moe_asr.model.positional import PositionalEncoding
from moe_asr.moe.config import MoEConfig


class TransformerDecoder(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, cfg: DecoderConfig, num_blocks: int,
                 moe: MoEConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_enc = PositionalEncoding(d_model, cfg.positional_dropout_rate)
        self.decoders = nn.ModuleList(
            DecoderLayer(
                d_model,
                MultiHeadedAttention(cfg.attention_heads, d_model, cfg.self_attention_dropout_rate),
                MultiHeadedAttention(cfg.attention_heads, d_model, cfg.src_attention_dropout_rate),
                build_ffn(moe, d_model, cfg.linear_units, cfg.activation, cfg.dropout_rate),
                cfg.dropout_rate,
            )
            for _ in range(num_blocks))
        self.after_norm = nn.LayerNorm(d_model, eps=1e-5)
        self.output_layer = nn.Linear(d_model, vocab_size)

    def forward(self, memory: Tensor, memory_mask: Tensor, ys_in: Tensor, ys_in_lens: Tensor) -> Tensor:
        """Teacher-forced logits ``[B, U, V]`` for inputs ``ys_in [B, U]`` (``<sos>`` + tokens)."""
        u = ys_in.shape[1]
        tgt_mask = (~make_pad_mask(ys_in_lens, u)).unsqueeze(1) & subsequent_mask(u, ys_in.device).unsqueeze(0)
        x = self.pos_enc(self.embed(ys_in))
        for layer in self.decoders:
            x = layer(x, tgt_mask, memory, memory_mask)
        return self.output_layer(self.after_norm(x))

    def forward_one_step(self, memory: Tensor, memory_mask: Tensor, tgt: Tensor, tgt_mask: Tensor,
                         cache: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Log-probs of the next token after prefixes ``tgt [N, u]``, reusing per-layer ``cache``."""
        x = self.pos_enc(self.embed(tgt))
        new_cache = []
        for i, layer in enumerate(self.decoders):
            x = layer(x, tgt_mask, memory, memory_mask, None if cache is None else cache[i])
            new_cache.append(x)
        return torch.log_softmax(self.output_layer(self.after_norm(x[:, -1])), dim=-1), new_cache


class BiTransformerDecoder(nn.Module):
    """U2++: an L2R decoder and (when ``r_num_blocks > 0``) an R2L decoder on reversed targets."""

    def __init__(self, vocab_size: int, d_model: int, cfg: DecoderConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.left_decoder = TransformerDecoder(vocab_size, d_model, cfg, cfg.num_blocks, moe)
        self.right_decoder = (TransformerDecoder(vocab_size, d_model, cfg, cfg.r_num_blocks, moe)
                              if cfg.r_num_blocks > 0 else None)

    def forward(self, memory: Tensor, memory_mask: Tensor, ys_in: Tensor, ys_in_lens: Tensor,
                r_ys_in: Tensor, reverse_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """Returns L2R logits, R2L logits (zeros when unused) and the output lengths."""
        left = self.left_decoder(memory, memory_mask, ys_in, ys_in_lens)
        if self.right_decoder is not None and reverse_weight > 0.0:
            right = self.right_decoder(memory, memory_mask, r_ys_in, ys_in_lens)
        else:
            right = torch.zeros_like(left)
        return left, right, ys_in_lens

    def forward_one_step(self, memory: Tensor, memory_mask: Tensor, tgt: Tensor, tgt_mask: Tensor,
                         cache: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        return self.left_decoder.forward_one_step(memory, memory_mask, tgt, tgt_mask, cache)
