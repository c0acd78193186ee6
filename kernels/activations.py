"""The activations every FFN may use, by config name: torch functions and the Triton kernels' codes.

One table for the model (convolution module), the experts, the reference loops
and the kernels, so a name means the same function everywhere.
"""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x, "swish": F.silu, "silu": F.silu, "relu": F.relu, "gelu": F.gelu}

# Codes of the Triton epilogues (``triton/common.py: apply_act``), constexpr ints.
CODES: dict[str, int] = {"identity": 0, "swish": 1, "silu": 1, "relu": 2, "gelu": 3}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def code(name: str) -> int:
    activation(name)  # same error for an unknown name
    return CODES[name]
