"""Triton kernels for the MoE layer: permute (counting sort + row gather), grouped GEMM
(forward, input grad and weight grad), unpermute (weighted combine and its backward).

Importing this package imports ``triton``; set ``TRITON_INTERPRET=1`` before
that to run the kernels on CPU tensors.
"""
