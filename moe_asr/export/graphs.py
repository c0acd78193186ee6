"""The exported graphs, each a thin module over the model's own forwards (nothing recomputed here).

- ``EncoderCTC``: full-context encoder + CTC on a padded batch.
- ``StreamingEncoder``: one chunk of a batch of streams, caches in and out, of
  fixed size (``chunk_size * num_left_chunks`` attention frames per layer, a
  mask marking those that hold a frame), so one graph serves every chunk.
- ``RescoringDecoder``: the L2R or R2L decoder, teacher-forced, for attention
  rescoring of n-best hypotheses.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_asr.model.decoder import TransformerDecoder
from moe_asr.model.encoder import StreamState
from moe_asr.model.u2pp import U2PPModel


def lengths_mask(lengths: Tensor, size: Tensor | int) -> Tensor:
    """``[B, 1, size]``, True on the first ``lengths`` positions (no data-dependent size, unlike
    ``make_pad_mask``, so the traced graph keeps ``size`` dynamic)."""
    return (torch.arange(size, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1)


class EncoderCTC(nn.Module):
    """``(feats [B, T, F], feats_lengths [B])`` -> CTC log-probs ``[B, T', V]``, their lengths
    and (``with_encoder_out``) the encoder output ``[B, T', d]`` for the decoders."""

    def __init__(self, model: U2PPModel, with_encoder_out: bool = True) -> None:
        super().__init__()
        self.encoder, self.ctc = model.encoder, model.ctc
        self.with_encoder_out = with_encoder_out

    def forward(self, feats: Tensor, feats_lengths: Tensor) -> tuple[Tensor, ...]:
        enc, mask = self.encoder(feats, feats_lengths, -1, -1)
        out = (self.ctc.log_softmax(enc), mask.squeeze(1).sum(1))
        return (*out, enc) if self.with_encoder_out else out


class StreamingEncoder(nn.Module):
    """One chunk of ``B`` streams through ``ConformerEncoder.forward_chunk``.

    Inputs: ``chunk [B, W, F]`` (W as ``stream_windows`` gives, fewer at the
    end), ``chunk_lengths [B]``, ``offset [B]`` (encoder frames done),
    ``cache_mask [B, R]``, ``att_cache [layers, B, h, R, 2 d_k]``,
    ``cnn_cache [layers, B, d, kernel - 1]``. Outputs: CTC log-probs and
    encoder output of the chunk, its valid frames per stream, and the next
    offset, cache mask and caches (same shapes). At the start everything is
    zero (``cache_mask`` all False).
    """

    def __init__(self, model: U2PPModel, chunk_size: int, num_left_chunks: int) -> None:
        super().__init__()
        if num_left_chunks < 0:
            raise ValueError("a streaming graph keeps a fixed cache: give num_left_chunks >= 0")
        if not model.cfg.encoder.causal:
            raise ValueError("streaming export needs a causal encoder (encoder.causal: true)")
        self.encoder, self.ctc = model.encoder, model.ctc
        self.chunk_size, self.num_left_chunks = chunk_size, num_left_chunks
        self.input_dim = model.cfg.input_dim
        self.windows = model.encoder.stream_windows(chunk_size, num_left_chunks)

    def initial_state(self, batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``offset, cache_mask, att_cache, cnn_cache`` of ``batch`` streams at their start."""
        layer = self.encoder.encoders[0]
        att, cnn = layer.initial_caches(batch)
        size = self.windows.required_cache_size
        layers = len(self.encoder.encoders)
        return (torch.zeros(batch, dtype=torch.long), torch.zeros(batch, size, dtype=torch.bool),
                att.new_zeros(layers, batch, att.shape[1], size, att.shape[3]),
                cnn.new_zeros(layers, *cnn.shape))

    def example(self, batch: int) -> tuple[Tensor, ...]:
        """Inputs of a first chunk (full windows, streams at their start)."""
        window = self.windows.window
        return (torch.zeros(batch, window, self.input_dim), torch.full((batch,), window),
                *self.initial_state(batch))

    def forward(self, chunk: Tensor, chunk_lengths: Tensor, offset: Tensor, cache_mask: Tensor,
                att_cache: Tensor, cnn_cache: Tensor) -> tuple[Tensor, ...]:
        state = StreamState(offset, torch.zeros_like(offset), cache_mask, list(att_cache.unbind(0)),
                            list(cnn_cache.unbind(0)))
        enc, new = self.encoder.forward_chunk(chunk, chunk_lengths, state, self.windows.required_cache_size)
        return (self.ctc.log_softmax(enc), enc, new.lengths, new.offset, new.cache_mask,
                torch.stack(new.att_cache), torch.stack(new.cnn_cache))


class RescoringDecoder(nn.Module):
    """``(encoder_out [B, T, d], encoder_out_lens [B], ys_in [B, U], ys_in_lens [B])`` -> token
    log-probs ``[B, U, V]``; ``ys_in`` is ``<sos>`` + tokens (reversed tokens for the R2L decoder)."""

    def __init__(self, decoder: TransformerDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, encoder_out: Tensor, encoder_out_lens: Tensor, ys_in: Tensor, ys_in_lens: Tensor) -> Tensor:
        mask = lengths_mask(encoder_out_lens, encoder_out.shape[1])
        return torch.log_softmax(self.decoder(encoder_out, mask, ys_in, ys_in_lens), dim=-1)
