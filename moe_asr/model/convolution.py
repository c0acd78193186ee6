"""Conformer convolution module, optionally causal, with a cache for streaming.

Pointwise conv + GLU, depthwise conv, norm, activation, pointwise conv. Padded
frames are zeroed after the GLU, so the depthwise conv sees exact zeros there
and an utterance's output does not depend on how much padding its batch has.
In causal mode the depthwise conv looks ``kernel - 1`` frames back: zeros at the
start of an utterance, the cache (last GLU outputs of the previous chunk) when
streaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_asr_kernels.activations import activation as get_activation


class ConvolutionModule(nn.Module):
    def __init__(self, channels: int, kernel_size: int = 15, activation: str = "swish",
                 norm: str = "batch_norm", causal: bool = False) -> None:
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1)
        self.lorder = kernel_size - 1 if causal else 0
        padding = 0 if causal else (kernel_size - 1) // 2
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size, padding=padding, groups=channels)
        self.use_layer_norm = norm == "layer_norm"
        self.norm = nn.LayerNorm(channels) if self.use_layer_norm else nn.BatchNorm1d(channels)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1)
        self.activation = get_activation(activation)

    def forward(self, x: Tensor, mask_pad: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, T, C]``, ``mask_pad [B, 1, T]`` (True = valid), ``cache [B, C, lorder]``."""
        x = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1).masked_fill(~mask_pad, 0.0)
        if self.lorder > 0:
            if cache is None or cache.shape[2] == 0:
                x = F.pad(x, (self.lorder, 0))
            else:
                x = torch.cat([cache, x], dim=2)
            new_cache = x[:, :, -self.lorder:]
        else:
            new_cache = x.new_zeros(x.shape[0], x.shape[1], 0)
        x = self.depthwise_conv(x)
        if self.use_layer_norm:
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = self.norm(x)
        x = self.pointwise_conv2(self.activation(x)).masked_fill(~mask_pad, 0.0)
        return x.transpose(1, 2), new_cache
