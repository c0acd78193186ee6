"""Conformer encoder with full-context, chunk-masked and batched streaming forwards.

``forward`` runs a whole padded batch under a chunk mask; ``forward_chunk``
advances a batch of streams by one chunk using attention K/V caches and
convolution caches (the streams may be at different positions, see
``StreamState``); ``forward_chunk_by_chunk`` drives it over whole utterances.
For the same chunk size and left context, both give the same encoder output on
every valid frame (tests/model/test_encoder_streaming.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_asr.model.attention import RelPositionMultiHeadedAttention
from moe_asr.model.cmvn import GlobalCMVN
from moe_asr.model.config import EncoderConfig
from moe_asr.model.convolution import ConvolutionModule
from moe_asr.model.encoder_layer import ConformerEncoderLayer
from moe_asr.model.ffn import build_ffn
from moe_asr.model.masks import chunk_attention_mask, make_pad_mask, sample_dynamic_chunk
from moe_asr.model.positional import RelPositionalEncoding
from moe_asr.model.subsampling import RATES, Conv2dSubsampling
from moe_asr.moe.config import MoEConfig


@dataclass
class StreamState:
    """What a batch of streams carries from one chunk to the next, one row per stream.

    The streams of a batch need not be at the same position: each row has its
    own offset, and the attention caches are right-aligned (a row's newest
    cached frame is the last column) with ``cache_mask`` marking the columns
    that hold a frame of that row. A stream that joined later, with a shorter
    history, is therefore padded on the left and masked there, and keeping the
    last ``required_cache_size`` columns keeps each stream's own last frames.
    """

    offset: Tensor              # [B] encoder frames each stream has advanced (padding included)
    lengths: Tensor             # [B] valid encoder frames so far (stops growing at the end)
    cache_mask: Tensor          # [B, T_cache] bool, True where the caches hold a frame of the stream
    att_cache: list[Tensor]     # per layer [B, h, T_cache, 2 * d_k]
    cnn_cache: list[Tensor]     # per layer [B, C, kernel - 1]: GLU outputs or module inputs (causal_pad)

    def select(self, rows: Tensor) -> StreamState:
        """The streams ``rows`` (indices, in that order), e.g. without those that have ended.

        Leading cache columns that no kept stream uses are dropped, so a long
        stream's history does not outlive it in the others' caches.
        """
        mask = self.cache_mask[rows]
        used = mask.any(0)
        first = int(used.int().argmax()) if bool(used.any()) else mask.shape[1]
        return StreamState(self.offset[rows], self.lengths[rows], mask[:, first:],
                           [c[rows, :, first:] for c in self.att_cache], [c[rows] for c in self.cnn_cache])

    @staticmethod
    def cat(states: Sequence[StreamState]) -> StreamState:
        """One batch of the streams of ``states`` in order (e.g. live streams + newly joined ones),
        the shorter attention caches padded on the left and masked."""
        width = max(s.cache_mask.shape[1] for s in states)

        def left_pad(x: Tensor, dim_from_end: int, value: float | bool) -> Tensor:
            return F.pad(x, (0, 0) * dim_from_end + (width - x.shape[-1 - dim_from_end], 0), value=value)

        return StreamState(
            torch.cat([s.offset for s in states]), torch.cat([s.lengths for s in states]),
            torch.cat([left_pad(s.cache_mask, 0, False) for s in states]),
            [torch.cat([left_pad(c, 1, 0.0) for c in layer]) for layer in zip(*(s.att_cache for s in states))],
            [torch.cat(layer) for layer in zip(*(s.cnn_cache for s in states))])


@dataclass(frozen=True)
class StreamWindows:
    """How a stream's input frames are cut for ``forward_chunk``.

    Chunk c's window is the input frames ``[c * stride, c * stride + window)``
    (fewer at the end); chunks continue while at least ``context`` frames (one
    output frame's receptive field) remain. Each stream keeps
    ``required_cache_size`` attention frames (-1: all).
    """

    stride: int
    window: int
    context: int
    required_cache_size: int


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, input_dim: int, moe: MoEConfig,
                 cmvn: GlobalCMVN | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.output_size
        self.global_cmvn = cmvn
        self.embed = Conv2dSubsampling(input_dim, d, RATES[cfg.input_layer])
        self.pos_enc = RelPositionalEncoding(d, cfg.positional_dropout_rate, cfg.rel_pos_shift)

        def ffn() -> nn.Module:
            return build_ffn(moe, d, cfg.linear_units, cfg.activation, cfg.dropout_rate)

        self.encoders = nn.ModuleList(
            ConformerEncoderLayer(
                d,
                RelPositionMultiHeadedAttention(cfg.attention_heads, d, cfg.attention_dropout_rate,
                                                cfg.rel_pos_shift),
                ffn(),
                ffn() if cfg.macaron_style else None,
                ConvolutionModule(d, cfg.cnn_module_kernel, cfg.activation, cfg.cnn_module_norm, cfg.causal,
                                  cfg.causal_pad)
                if cfg.use_cnn_module else None,
                cfg.dropout_rate,
            )
            for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    @property
    def output_size(self) -> int:
        return self.cfg.output_size

    def _front(self, xs: Tensor, mask: Tensor, cache_len: int,
               offset: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """CMVN, subsampling and the position encodings of ``cache_len`` cached frames + this
        window's, the window's first frame at ``offset [B]`` per stream (None: 0)."""
        if self.global_cmvn is not None:
            xs = self.global_cmvn(xs)
        xs, mask = self.embed(xs, mask)
        xs, pos_emb = self.pos_enc(xs, cache_len, offset)
        return xs, pos_emb, mask

    def _chunking(self, frames: int, chunk_size: int, num_left_chunks: int) -> tuple[int, int]:
        """Chunk size and left chunks for a forward; ``chunk_size == 0`` means the training rule."""
        if chunk_size != 0:
            return chunk_size, num_left_chunks
        if self.cfg.use_dynamic_chunk:
            return sample_dynamic_chunk(frames, self.cfg.use_dynamic_left_chunk, self.cfg.max_dynamic_chunk)
        if self.cfg.static_chunk_size > 0:
            return self.cfg.static_chunk_size, num_left_chunks
        return -1, -1

    def forward(self, xs: Tensor, xs_lens: Tensor, chunk_size: int = 0,
                num_left_chunks: int = -1) -> tuple[Tensor, Tensor]:
        """``xs [B, T, idim]`` -> ``(out [B, T', d], mask [B, 1, T'])``.

        ``chunk_size``: < 0 full context, > 0 that chunk size with
        ``num_left_chunks`` of left context (-1: all), 0 the training rule
        (dynamic or static chunk from the config).
        """
        mask = ~make_pad_mask(xs_lens, xs.shape[1]).unsqueeze(1)
        xs, pos_emb, mask = self._front(xs, mask, 0, None)
        chunk, left = self._chunking(xs.shape[1], chunk_size, num_left_chunks)
        att_mask = chunk_attention_mask(mask, chunk, left)
        for layer in self.encoders:
            xs, _, _ = layer(xs, att_mask, pos_emb, mask)
        return self.after_norm(xs), mask

    def init_state(self, batch_size: int, device: torch.device | None = None) -> StreamState:
        """The state of ``batch_size`` streams at their start (on the encoder's device unless given)."""
        device = device or self.after_norm.weight.device
        caches = [layer.initial_caches(batch_size) for layer in self.encoders]
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        return StreamState(zeros, zeros.clone(), torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
                           [att.to(device) for att, _ in caches], [cnn.to(device) for _, cnn in caches])

    def forward_chunk(self, xs: Tensor, xs_lens: Tensor, state: StreamState,
                      required_cache_size: int = -1) -> tuple[Tensor, StreamState]:
        """Advance every stream by one chunk; the streams may be at different positions.

        ``xs [B, W, idim]`` is each stream's next input window (``W = (chunk -
        1) * rate + right_context + 1`` frames, fewer at the end), ``xs_lens
        [B]`` its valid frames per stream (0 for a stream that has ended).
        ``required_cache_size``: attention frames each stream keeps (chunk size
        x left chunks), -1 for all. Returns ``[B, chunk, d]`` (rows past a
        stream's end are padding) and the new state.
        """
        mask = ~make_pad_mask(xs_lens, xs.shape[1]).unsqueeze(1)
        xs, pos_emb, mask = self._front(xs, mask, state.cache_mask.shape[1], state.offset)
        att_mask = torch.cat([state.cache_mask.unsqueeze(1), mask], dim=2)
        att_caches, cnn_caches = [], []
        for layer, att_cache, cnn_cache in zip(self.encoders, state.att_cache, state.cnn_cache):
            xs, att_cache, cnn_cache = layer(xs, att_mask, pos_emb, mask, att_cache, cnn_cache)
            att_caches.append(att_cache)
            cnn_caches.append(cnn_cache)
        cache_mask = att_mask.squeeze(1)
        if required_cache_size >= 0:
            first = cache_mask.shape[1] - min(required_cache_size, cache_mask.shape[1])
            cache_mask, att_caches = cache_mask[:, first:], [c[:, :, first:] for c in att_caches]
        new_state = StreamState(state.offset + xs.shape[1], state.lengths + mask.squeeze(1).sum(1),
                                cache_mask, att_caches, cnn_caches)
        return self.after_norm(xs), new_state

    def stream_windows(self, chunk_size: int, num_left_chunks: int = -1) -> StreamWindows:
        """The input windows of ``chunk_size`` output frames with ``num_left_chunks`` of left context."""
        if chunk_size <= 0:
            raise ValueError(f"streaming needs chunk_size > 0, got {chunk_size}")
        rate, context = self.embed.rate, self.embed.right_context + 1
        return StreamWindows(rate * chunk_size, (chunk_size - 1) * rate + context, context,
                             chunk_size * num_left_chunks if num_left_chunks >= 0 else -1)

    def forward_chunk_by_chunk(self, xs: Tensor, xs_lens: Tensor, chunk_size: int,
                               num_left_chunks: int = -1) -> tuple[Tensor, Tensor]:
        """Stream whole padded utterances through ``forward_chunk``; same outputs as ``forward``."""
        w = self.stream_windows(chunk_size, num_left_chunks)
        state = self.init_state(xs.shape[0], xs.device)
        outputs = []
        for start in range(0, xs.shape[1] - w.context + 1, w.stride):
            end = min(start + w.window, xs.shape[1])
            lens = (xs_lens - start).clamp(0, end - start)
            ys, state = self.forward_chunk(xs[:, start:end], lens, state, w.required_cache_size)
            outputs.append(ys)
        d = self.output_size
        out = torch.cat(outputs, dim=1) if outputs else xs.new_zeros(xs.shape[0], 0, d)
        return out, ~make_pad_mask(state.lengths, out.shape[1]).unsqueeze(1)
