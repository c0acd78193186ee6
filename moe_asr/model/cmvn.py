"""Global CMVN as a module, so the statistics travel inside the model's checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn


class GlobalCMVN(nn.Module):
    def __init__(self, mean: Tensor, istd: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("istd", istd.float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) * self.istd

    @classmethod
    def from_json(cls, path: str | Path, dim: int) -> "GlobalCMVN":
        """Read WeNet-style stats ``{"mean_stat", "var_stat", "frame_num"}`` (sums over frames)."""
        try:
            stats = json.loads(Path(path).read_text())
            n = float(stats["frame_num"])
            mean = torch.tensor(stats["mean_stat"], dtype=torch.float64) / n
            var = torch.tensor(stats["var_stat"], dtype=torch.float64) / n - mean.square()
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a CMVN stats file ({e!r}); expected JSON with "
                             "mean_stat, var_stat, frame_num") from None
        if mean.numel() != dim:
            raise ValueError(f"{path}: CMVN has {mean.numel()} dims, the model expects {dim}")
        return cls(mean, var.clamp_min(1e-20).rsqrt())
