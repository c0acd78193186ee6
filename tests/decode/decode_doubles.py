"""A tiny stand-in for the U2++ model that implements exactly the interface decoding uses.

The decoder is a small RNN over the token prefix plus a bias from the masked mean of
the encoder memory, so its log-probs depend on the whole prefix and on the valid
frames only (padding must not matter). With ``recurrent=False`` and ``memory_scale=0``
the next-token distribution depends only on the last token: a bigram table that tests
can read off and sum by hand.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import nn

from moe_asr.symbols import sos_eos_id


class FakeDecoder(nn.Module):
    def __init__(self, vocab: int, d_model: int, hidden: int = 8, recurrent: bool = True,
                 memory_scale: float = 1.0, has_r2l: bool = True, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        # Stands in for the R2L decoder module; decoding only asks whether it exists.
        self.right_decoder = nn.Identity() if has_r2l else None
        self.memory_scale = memory_scale
        self.recurrent = nn.Parameter(torch.randn(2, hidden, hidden, generator=g) * recurrent)
        self.embed = nn.Parameter(torch.randn(2, vocab, hidden, generator=g))
        self.out = nn.Parameter(torch.randn(2, hidden, vocab, generator=g) * 1.5)
        self.mem_proj = nn.Parameter(torch.randn(2, d_model, vocab, generator=g))
        self.requires_grad_(False)

    def _memory_bias(self, memory: torch.Tensor, memory_mask: torch.Tensor, side: int) -> torch.Tensor:
        mask = memory_mask.transpose(1, 2).to(memory.dtype)  # [N, T, 1]
        mean = (memory * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.memory_scale * mean @ self.mem_proj[side]  # [N, V]

    def _states(self, tokens: torch.Tensor, side: int, h: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RNN states after each of ``tokens [N, u]``, starting from state ``h``."""
        if h is None:
            h = torch.zeros(tokens.size(0), self.embed.size(-1))
        states = []
        for j in range(tokens.size(1)):
            h = torch.tanh(h @ self.recurrent[side] + self.embed[side][tokens[:, j]])
            states.append(h)
        return torch.stack(states, dim=1)

    def bigram_log_probs(self, side: int = 0) -> torch.Tensor:
        """``[V, V]`` log p(next | last) when built with recurrent=False, memory_scale=0."""
        return (torch.tanh(self.embed[side]) @ self.out[side]).log_softmax(-1)

    def forward_one_step(self, memory, memory_mask, tgt, tgt_mask, cache=None):
        n, u = tgt.shape
        assert tgt_mask.shape == (n, u, u) and tgt_mask.dtype == torch.bool
        assert torch.equal(tgt_mask[0], torch.ones(u, u, dtype=torch.bool).tril())
        if cache is None:
            states = self._states(tgt, 0)
        else:
            assert len(cache) == 1 and cache[0].shape[:2] == (n, u - 1)
            new = self._states(tgt[:, -1:], 0, cache[0][:, -1])
            states = torch.cat([cache[0], new], dim=1)
        logits = states[:, -1] @ self.out[0] + self._memory_bias(memory, memory_mask, 0)
        return logits.log_softmax(-1), [states]

    def forward(self, memory, memory_mask, ys_in_pad, ys_in_lens, r_ys_in_pad, reverse_weight):
        l2r = self._states(ys_in_pad, 0) @ self.out[0] + self._memory_bias(memory, memory_mask, 0)[:, None]
        if reverse_weight > 0 and self.right_decoder is not None:
            r2l = (self._states(r_ys_in_pad, 1) @ self.out[1]
                   + self._memory_bias(memory, memory_mask, 1)[:, None])
        else:
            r2l = torch.zeros_like(l2r)
        return l2r, r2l, ys_in_lens


class _FakeEncoder(nn.Module):
    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj
        self.chunk_calls: list[tuple[int, int]] = []

    def forward(self, feats, feats_lengths):
        mask = torch.arange(feats.size(1))[None, :] < feats_lengths[:, None]
        return torch.tanh(self.proj(feats)), mask[:, None, :]

    def forward_chunk_by_chunk(self, feats, feats_lengths, chunk_size, num_left_chunks):
        self.chunk_calls.append((chunk_size, num_left_chunks))
        return self(feats, feats_lengths)


class _FakeCTC(nn.Module):
    def __init__(self, d_model: int, vocab: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(d_model, vocab, generator=g) * 3)

    def log_softmax(self, x):
        return (x @ self.weight).log_softmax(-1)


class FakeModel(nn.Module):
    """Encoder = tanh(linear) without subsampling, so encoder length == feature length."""

    def __init__(self, vocab: int = 5, d_model: int = 6, input_dim: int = 80, seed: int = 0,
                 has_r2l: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        proj = nn.Linear(input_dim, d_model)
        with torch.no_grad():
            proj.weight.copy_(torch.randn(d_model, input_dim, generator=g) * 0.3)
        self.encoder = _FakeEncoder(proj)
        self.ctc = _FakeCTC(d_model, vocab, seed + 1)
        self.decoder = FakeDecoder(vocab, d_model, has_r2l=has_r2l, seed=seed + 2)
        self.sos = self.eos = sos_eos_id(vocab)

    def encode(self, feats, feats_lengths, chunk_size=-1, num_left_chunks=-1):
        return self.encoder(feats, feats_lengths)


def sequence_score(decoder, memory, memory_mask, tokens, sos, eos) -> float:
    """L2R score (incl. eos) of one hypothesis, recomputed step by step without cache."""
    prefix = [sos]
    total = 0.0
    for tok in list(tokens) + [eos]:
        u = len(prefix)
        logp, _ = decoder.forward_one_step(
            memory, memory_mask, torch.tensor([prefix]), torch.ones(1, u, u, dtype=torch.bool).tril())
        total += float(logp[0, tok])
        prefix.append(tok)
    return total


def exhaustive_best(decoder, memory, memory_mask, tokens, max_len, sos, eos):
    """Best (sequence, L2R score) over every sequence of ``tokens`` up to ``max_len`` long."""
    best = None
    for n in range(max_len + 1):
        for seq in itertools.product(tokens, repeat=n):
            score = sequence_score(decoder, memory, memory_mask, seq, sos, eos)
            if best is None or score > best[1]:
                best = (list(seq), score)
    return best
