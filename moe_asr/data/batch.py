"""The Batch contract between the data pipeline and the model."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_asr.symbols import UNK_ID


@dataclass
class Batch:
    """Padded features and targets of B utterances.

    ``feats`` is float32 [B, T, num_mel_bins] zero-padded past ``feats_lengths``;
    ``targets`` is int64 [B, U] padded with ``moe_asr.symbols.IGNORE_ID`` past
    ``target_lengths`` (no token: every loss skips it).
    """

    keys: list[str]
    feats: torch.Tensor
    feats_lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(self.keys, *(t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)`` so host-to-GPU copies can be asynchronous."""
        return Batch(self.keys, *(t.pin_memory() for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.feats, self.feats_lengths, self.targets, self.target_lengths


def filler_batch(input_dim: int, frames: int = 100) -> Batch:
    """One silent utterance with a one-token target, never counted: the forward a rank without data runs
    to stay in step with its peers' collectives (the expert-parallel all-to-alls)."""
    return Batch(["<filler>"], torch.zeros(1, frames, input_dim), torch.tensor([frames]),
                 torch.full((1, 1), UNK_ID, dtype=torch.long), torch.tensor([1]))
