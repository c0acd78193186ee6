"""Label-smoothed cross entropy for the attention decoders (KL to the smoothed target)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from moe_asr.symbols import IGNORE_ID


def label_smoothing_loss(logits: Tensor, target: Tensor, smoothing: float,
                         normalize_length: bool = False) -> Tensor:
    """KL(smoothed one-hot || softmax(logits)) summed over valid tokens.

    The target keeps ``1 - smoothing`` on the true token and spreads
    ``smoothing`` over the other V - 1. Divided by the batch size (WeNet's
    default) or by the number of tokens when ``normalize_length``.
    """
    v = logits.shape[-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = target != IGNORE_ID
    nll = -logp.gather(-1, target.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
    confidence, low = 1.0 - smoothing, smoothing / (v - 1)
    cross = confidence * nll + low * (-logp.sum(-1) - nll)
    entropy = _xlogx(confidence) + (v - 1) * _xlogx(low)  # sum of t*log(t) over the target
    loss = ((cross + entropy) * valid).sum()
    return loss / (valid.sum().clamp(min=1) if normalize_length else logits.shape[0])


def _xlogx(p: float) -> float:
    return p * math.log(p) if p > 0 else 0.0


def token_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    valid = target != IGNORE_ID
    return ((logits.argmax(-1) == target) & valid).sum() / valid.sum().clamp(min=1)
