"""Run the Triton kernels on CPU through Triton's interpreter when there is no GPU.

Set here, for the whole suite, because it must be set before anything imports
``triton``: ``triton.jit`` reads it when a kernel is defined, and a module that
imports triton on the way (``torch.utils.flop_counter`` does) and is collected
before ``tests/kernels`` leaves the kernels' helpers compiled for a GPU, which
the interpreter then refuses to call.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
