"""Conformer convolution module, optionally causal, with a cache for streaming.

Pointwise conv + GLU, depthwise conv, norm, activation, pointwise conv. Padded
frames are zeroed after the GLU, so the depthwise conv sees exact zeros there
and an utterance's output does not depend on how much padding its batch has.
In causal mode the depthwise conv looks ``kernel - 1`` frames back: zeros at the
start of an utterance, the cache of the previous chunk when streaming. Where
those frames enter is ``causal_pad``: ``glu_output`` (the cache holds GLU
outputs, the start sees zeros) or ``input`` (WeNet's: the cache holds module
inputs, the start sees ``glu(bias)`` of zero inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_asr_kernels.activations import activation as get_activation


class ConvolutionModule(nn.Module):
    def __init__(self, channels: int, kernel_size: int = 15, activation: str = "swish",
                 norm: str = "batch_norm", causal: bool = False, causal_pad: str = "glu_output") -> None:
        super().__init__()
        if not causal and kernel_size % 2 == 0:
            raise ValueError(f"a non-causal convolution needs an odd kernel, got {kernel_size}")
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1)
        self.lorder = kernel_size - 1 if causal else 0
        self.pad_input = causal and causal_pad == "input"
        padding = 0 if causal else (kernel_size - 1) // 2
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size, padding=padding, groups=channels)
        self.use_layer_norm = norm == "layer_norm"
        self.norm = nn.LayerNorm(channels) if self.use_layer_norm else nn.BatchNorm1d(channels)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1)
        self.activation = get_activation(activation)

    def _left_context(self, x: Tensor, cache: Tensor | None) -> tuple[Tensor, Tensor]:
        """``x [B, C, T]`` with ``lorder`` frames of left context in front, and the next cache."""
        if self.lorder == 0:
            return x, x.new_zeros(x.shape[0], x.shape[1], 0)
        if cache is None or cache.shape[2] == 0:
            x = F.pad(x, (self.lorder, 0))
        else:
            x = torch.cat([cache, x], dim=2)
        return x, x[:, :, -self.lorder:]

    def forward(self, x: Tensor, mask_pad: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, T, C]``, ``mask_pad [B, 1, T]`` (True = valid), ``cache [B, C, lorder]``."""
        x = x.transpose(1, 2)
        if self.pad_input:
            # Padded frames past the end may then carry glu(bias): a causal conv never looks right.
            x, new_cache = self._left_context(x.masked_fill(~mask_pad, 0.0), cache)
            x = F.glu(self.pointwise_conv1(x), dim=1)
        else:
            x, new_cache = self._left_context(F.glu(self.pointwise_conv1(x), dim=1).masked_fill(~mask_pad, 0.0),
                                              cache)
        x = self.depthwise_conv(x)
        if self.use_layer_norm:
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = self.norm(x)
        x = self.pointwise_conv2(self.activation(x)).masked_fill(~mask_pad, 0.0)
        return x.transpose(1, 2), new_cache
