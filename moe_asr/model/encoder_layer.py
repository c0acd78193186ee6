"""One Conformer block: half-step MoE FFN, self-attention, convolution, half-step MoE FFN."""
from __future__ import annotations

from torch import Tensor, nn

from moe_asr.model.attention import RelPositionMultiHeadedAttention
from moe_asr.model.convolution import ConvolutionModule
from moe_asr.moe.layer import MoEFeedForward


class ConformerEncoderLayer(nn.Module):
    def __init__(self, size: int, self_attn: RelPositionMultiHeadedAttention,
                 feed_forward: MoEFeedForward, feed_forward_macaron: MoEFeedForward | None,
                 conv_module: ConvolutionModule | None, dropout: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.feed_forward_macaron = feed_forward_macaron
        self.conv_module = conv_module
        self.norm_ff = nn.LayerNorm(size, eps=1e-5)
        self.norm_mha = nn.LayerNorm(size, eps=1e-5)
        if feed_forward_macaron is not None:
            self.norm_ff_macaron = nn.LayerNorm(size, eps=1e-5)
        self.ff_scale = 0.5 if feed_forward_macaron is not None else 1.0
        if conv_module is not None:
            self.norm_conv = nn.LayerNorm(size, eps=1e-5)
            self.norm_final = nn.LayerNorm(size, eps=1e-5)
        self.dropout = nn.Dropout(dropout)

    def initial_caches(self, batch: int) -> tuple[Tensor, Tensor]:
        """The caches of ``batch`` streams at their start: no attention frames, and zeros as the
        convolution's left context, which is what the full forward pads with (GLU outputs or module
        inputs alike). Real shapes rather than empty ones let streams that start at different
        chunks share one batch."""
        w = self.norm_mha.weight
        att = w.new_zeros(batch, self.self_attn.h, 0, 2 * self.self_attn.d_k)
        if self.conv_module is None:
            return att, w.new_zeros(batch, 0, 0)
        return att, w.new_zeros(batch, w.shape[0], self.conv_module.lorder)

    def forward(self, x: Tensor, mask: Tensor, pos_emb: Tensor, mask_pad: Tensor,
                att_cache: Tensor | None = None, cnn_cache: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the output and the new attention and convolution caches."""
        valid = mask_pad.squeeze(1)
        if self.feed_forward_macaron is not None:
            x = x + self.ff_scale * self.dropout(self.feed_forward_macaron(self.norm_ff_macaron(x), valid))
        att, new_att_cache = self.self_attn(self.norm_mha(x), mask, pos_emb, att_cache)
        x = x + self.dropout(att)
        new_cnn_cache = x.new_zeros(x.shape[0], 0, 0)
        if self.conv_module is not None:
            conv, new_cnn_cache = self.conv_module(self.norm_conv(x), mask_pad, cnn_cache)
            x = x + self.dropout(conv)
        x = x + self.ff_scale * self.dropout(self.feed_forward(self.norm_ff(x), valid))
        if self.conv_module is not None:
            x = self.norm_final(x)
        return x, new_att_cache, new_cnn_cache
