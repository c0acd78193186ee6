"""Shared helpers of the Triton kernels."""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import ContextManager

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def input_precision(dtype: torch.dtype) -> str:
    """fp32 matmuls follow torch's setting: IEEE unless TF32 was allowed.

    Read through ``fp32_precision``, which reflects both APIs (the legacy
    ``allow_tf32 = True`` and ``set_float32_matmul_precision("high")`` set it to
    ``tf32``, and so does ``torch.backends.fp32_precision = "tf32"``); reading
    ``allow_tf32`` raises once the new API has been used.
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision != "tf32":
        return "ieee"
    return "tf32"


def on_device(t: torch.Tensor) -> ContextManager:
    """Launch on ``t``'s GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


@triton.jit
def apply_act(z, ACT: tl.constexpr):
    """act(z) for fp32 ``z``."""
    if ACT == 1:
        return z * tl.sigmoid(z)
    elif ACT == 2:
        return tl.maximum(z, 0.0)
    elif ACT == 3:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        return z


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz for fp32 ``z``."""
    if ACT == 1:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == 2:
        return (z > 0.0).to(tl.float32)
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    else:
        return tl.full(z.shape, 1.0, tl.float32)
