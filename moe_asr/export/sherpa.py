"""Graphs for sherpa-onnx's WeNet CTC model type: its input/output order and metadata keys.

sherpa-onnx (``OfflineRecognizer.from_wenet_ctc``, ``OnlineRecognizer.from_wenet_ctc``)
runs a file's inputs in order and reads its metadata:

- offline: ``x [N, T, 80]``, ``x_lens [N]`` -> ``log_probs [N, T', V]``,
  ``log_probs_lens [N]``; metadata ``model_type=wenet_ctc``, ``vocab_size``,
  ``subsampling_factor``.
- streaming (one stream): ``x [1, W, 80]``, ``offset [1]``,
  ``required_cache_size [1]``, ``attn_cache [blocks, head, R, 2 d_k]``,
  ``conv_cache [blocks, 1, d, kernel - 1]``, ``attn_mask [1, 1, R + chunk]``
  -> ``log_probs [1, chunk, V]``, next ``attn_cache``, next ``conv_cache``;
  metadata also ``head``, ``num_blocks``, ``output_size``,
  ``cnn_module_kernel``, ``right_context`` (and, for people, ``chunk_size``,
  ``left_chunks``). The runtime starts ``offset`` at ``R = chunk_size *
  num_left_chunks`` (from its own config, which must equal the exported one)
  and masks the cache columns not yet filled; our graph's offset is
  ``offset - required_cache_size``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_asr.export.graphs import EncoderCTC, StreamingEncoder
from moe_asr.model.u2pp import U2PPModel


def offline_graph(model: U2PPModel) -> EncoderCTC:
    return EncoderCTC(model, with_encoder_out=False)


class SherpaStreaming(nn.Module):
    """``StreamingEncoder`` for one stream in the runtime's layout (no batch axis in ``attn_cache``)."""

    def __init__(self, model: U2PPModel, chunk_size: int, num_left_chunks: int) -> None:
        super().__init__()
        if not model.cfg.encoder.use_cnn_module:
            raise ValueError("sherpa-onnx's WeNet streaming model needs the convolution module (its conv_cache)")
        self.stream = StreamingEncoder(model, chunk_size, num_left_chunks)

    def example(self) -> tuple[Tensor, ...]:
        """Inputs as the runtime builds them for the first chunk."""
        w = self.stream.windows
        r = w.required_cache_size
        _, _, att, cnn = self.stream.initial_state(1)
        mask = torch.ones(1, 1, r + self.stream.chunk_size, dtype=torch.bool)
        mask[:, :, :r] = False
        size = torch.tensor([r])
        return (torch.zeros(1, w.window, self.stream.input_dim), size.clone(), size, att.squeeze(1), cnn,
                mask)

    def forward(self, x: Tensor, offset: Tensor, required_cache_size: Tensor, attn_cache: Tensor,
                conv_cache: Tensor, attn_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lengths = offset.new_ones(x.shape[0]) * x.shape[1]
        cache_mask = attn_mask[:, 0, :attn_cache.shape[2]]
        log_probs, _, _, _, _, att, cnn = self.stream(x, lengths, offset - required_cache_size, cache_mask,
                                                      attn_cache.unsqueeze(1), conv_cache)
        return log_probs, att.squeeze(1), cnn


def offline_metadata(model: U2PPModel) -> dict[str, str | int]:
    return {"model_type": "wenet_ctc", "version": "1", "model_author": "moe-asr", "comment": "non-streaming",
            "vocab_size": model.vocab_size, "subsampling_factor": model.encoder.embed.rate}


def streaming_metadata(model: U2PPModel, chunk_size: int, num_left_chunks: int) -> dict[str, str | int]:
    enc = model.encoder.cfg
    return {**offline_metadata(model), "comment": "streaming", "chunk_size": chunk_size,
            "left_chunks": num_left_chunks, "head": enc.attention_heads, "num_blocks": enc.num_blocks,
            "output_size": enc.output_size, "cnn_module_kernel": enc.cnn_module_kernel,
            "right_context": model.encoder.embed.right_context}
