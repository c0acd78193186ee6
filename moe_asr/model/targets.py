"""Target sequences for the attention decoders: <sos>/<eos> framing and reversal (R2L)."""
from __future__ import annotations

import torch
from torch import Tensor

from moe_asr.symbols import IGNORE_ID


def add_sos_eos(ys: Tensor, sos: int, eos: int) -> tuple[Tensor, Tensor]:
    """``ys [B, U]`` padded with IGNORE_ID -> decoder inputs ``[sos] + ys`` (padded with eos)
    and outputs ``ys + [eos]`` (padded with IGNORE_ID), both ``[B, U + 1]``."""
    b = ys.shape[0]
    lengths = (ys != IGNORE_ID).sum(1)
    ys_in = torch.cat([ys.new_full((b, 1), sos), ys.masked_fill(ys == IGNORE_ID, eos)], dim=1)
    ys_out = torch.cat([ys, ys.new_full((b, 1), IGNORE_ID)], dim=1)
    ys_out[torch.arange(b, device=ys.device), lengths] = eos
    return ys_in, ys_out


def reverse_padded(ys: Tensor, lengths: Tensor, pad: int = IGNORE_ID) -> Tensor:
    """Reverse the first ``lengths[b]`` tokens of each row, keep padding at the end."""
    u = ys.shape[1]
    pos = torch.arange(u, device=ys.device).unsqueeze(0)
    src = (lengths.unsqueeze(1) - 1 - pos).clamp(min=0)
    return torch.where(pos < lengths.unsqueeze(1), ys.gather(1, src), torch.full_like(ys, pad))
