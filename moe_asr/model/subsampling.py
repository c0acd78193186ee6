"""Conv2d front end: 80-dim fbank at 10 ms -> d_model at 40/60/80 ms.

Output frame t depends on input frames ``[t * rate, t * rate + right_context]``,
which is what lets streaming cut the input into overlapping windows and still
produce exactly the frames of a full-utterance forward.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

# (kernel, stride) of each conv layer, per subsampling rate.
_LAYERS = {4: [(3, 2), (3, 2)], 6: [(3, 2), (5, 3)], 8: [(3, 2), (3, 2), (3, 2)]}
RATES = {"conv2d": 4, "conv2d6": 6, "conv2d8": 8}


class Conv2dSubsampling(nn.Module):
    def __init__(self, idim: int, odim: int, rate: int = 4) -> None:
        super().__init__()
        self.layers = _LAYERS[rate]
        convs: list[nn.Module] = []
        freq, channels = idim, 1
        for kernel, stride in self.layers:
            convs += [nn.Conv2d(channels, odim, kernel, stride), nn.ReLU()]
            channels, freq = odim, (freq - kernel) // stride + 1
        self.conv = nn.Sequential(*convs)
        self.out = nn.Linear(odim * freq, odim)
        self.rate = math.prod(s for _, s in self.layers)
        self.right_context = sum((k - 1) * math.prod(s for _, s in self.layers[:i])
                                 for i, (k, _) in enumerate(self.layers))

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, T, idim]``, ``mask [B, 1, T]`` -> ``[B, T', odim]``, ``[B, 1, T']``.

        A batch shorter than the receptive field is padded to it, giving one
        fully masked frame instead of a convolution error.
        """
        short = self.right_context + 1 - x.shape[1]
        if short > 0:
            x = F.pad(x, (0, 0, 0, short))
            mask = F.pad(mask, (0, short), value=False)
        x = self.conv(x.unsqueeze(1))
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))
        for kernel, stride in self.layers:
            mask = mask[:, :, kernel - 1::stride]
        return x, mask

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Valid output frames for ``lengths`` valid input frames (0 when too short)."""
        for kernel, stride in self.layers:
            lengths = ((lengths - kernel).div(stride, rounding_mode="floor") + 1).clamp(min=0)
        return lengths
