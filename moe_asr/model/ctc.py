"""CTC head: projection to the vocabulary and the CTC loss (blank ``BLANK_ID``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_asr.symbols import BLANK_ID, IGNORE_ID


class CTC(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ctc_lo = nn.Linear(d_model, vocab_size)
        self.dropout = dropout

    def forward(self, hs: Tensor, hs_lens: Tensor, ys: Tensor, ys_lens: Tensor) -> Tensor:
        """Summed CTC loss over the batch divided by the batch size (WeNet's normalisation).

        ``zero_infinity``: an utterance too short for its transcript contributes
        0 (and no NaN gradient) instead of poisoning the batch.
        """
        logits = self.ctc_lo(F.dropout(hs, self.dropout, self.training))
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)
        targets = ys[ys != IGNORE_ID]
        loss = F.ctc_loss(log_probs, targets, hs_lens, ys_lens, blank=BLANK_ID, reduction="sum",
                          zero_infinity=True)
        return loss / hs.shape[0]

    def log_softmax(self, hs: Tensor) -> Tensor:
        return torch.log_softmax(self.ctc_lo(hs), dim=-1)
