"""Padding and chunk masks; boolean, True where attention is allowed.

The chunk mask is what makes one model serve streaming and full context: a
frame attends to its own chunk and ``num_left_chunks`` chunks before it (all of
them when -1). Training draws the chunk size per batch (U2 dynamic chunk).
"""
from __future__ import annotations

import torch
from torch import Tensor


def make_pad_mask(lengths: Tensor, max_len: int = 0) -> Tensor:
    """``[B, T]`` True at padded positions."""
    max_len = max(max_len, int(lengths.max().item()) if lengths.numel() else 0)
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)


def subsequent_mask(size: int, device: torch.device | None = None) -> Tensor:
    """``[size, size]`` lower-triangular: position i sees 0..i (decoder self-attention)."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def subsequent_chunk_mask(size: int, chunk_size: int, num_left_chunks: int = -1,
                          device: torch.device | None = None) -> Tensor:
    """``[size, size]``: frame i sees chunks ``i // chunk_size - num_left_chunks`` .. its own."""
    idx = torch.arange(size, device=device)
    chunk = idx // chunk_size
    end = ((chunk + 1) * chunk_size).clamp(max=size)
    if num_left_chunks < 0:
        start = torch.zeros_like(idx)
    else:
        start = ((chunk - num_left_chunks) * chunk_size).clamp(min=0)
    return (idx.unsqueeze(0) >= start.unsqueeze(1)) & (idx.unsqueeze(0) < end.unsqueeze(1))


def sample_dynamic_chunk(max_len: int, use_dynamic_left_chunk: bool, max_chunk: int = 25) -> tuple[int, int]:
    """WeNet's per-batch draw: half the time full context, else a chunk of 1..``max_chunk`` frames.

    ``c = randint(1, T)``; if ``c > T // 2`` full context, else ``c % max_chunk + 1``
    (WeNet: 25); with dynamic left chunks, ``randint(0, (T - 1) // c)`` left chunks.
    Uses torch's global RNG so a seeded, resumed run draws the same sizes.
    """
    if max_len <= 1:
        return max_len, -1
    chunk = int(torch.randint(1, max_len, (1,)).item())
    if chunk > max_len // 2:
        return max_len, -1
    chunk = chunk % max_chunk + 1
    num_left = -1
    if use_dynamic_left_chunk:
        max_left = (max_len - 1) // chunk
        num_left = int(torch.randint(0, max_left, (1,)).item()) if max_left > 0 else 0
    return chunk, num_left


def chunk_attention_mask(pad_mask: Tensor, chunk_size: int, num_left_chunks: int) -> Tensor:
    """Combine the key padding mask ``[B, 1, T]`` with a chunk mask -> ``[B, T, T]``.

    ``chunk_size <= 0`` means full context (padding mask only, broadcast).
    """
    if chunk_size <= 0:
        return pad_mask
    size = pad_mask.shape[-1]
    return pad_mask & subsequent_chunk_mask(size, chunk_size, num_left_chunks, pad_mask.device).unsqueeze(0)
