"""Run the Triton kernels on CPU through Triton's interpreter when there is no GPU.

Must run before any ``kernels.triton`` module is imported (``triton.jit``
reads the variable when a kernel is defined).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
