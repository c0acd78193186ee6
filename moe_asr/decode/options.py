"""How to decode: the context the encoder sees and the search, validated once, here.

Every decoding entry point (``decode``, ``StreamingRecognizer``, the
recognition pipeline, ``moe-asr recognize``) takes one ``DecodeOptions``, so
the rules about chunk sizes and their sentinels live in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

FULL_CONTEXT = -1  # chunk_size: the whole utterance; num_left_chunks: every earlier chunk


@dataclass(frozen=True)
class DecodeOptions:
    # Encoder chunk in frames after subsampling, or FULL_CONTEXT. (0 is refused: to the
    # encoder it means "draw a chunk as in training".)
    chunk_size: int = FULL_CONTEXT
    # Chunks of left context each chunk sees, or FULL_CONTEXT (all).
    num_left_chunks: int = FULL_CONTEXT
    # Run the encoder chunk by chunk with its caches, as a streaming server does, instead
    # of one chunk-masked pass over the whole utterance; needs chunk_size > 0.
    streaming: bool = False
    # Utterances decoded concurrently when streaming (one batch per chunk).
    streams: int = 16
    # Prefix beam (also the rescoring n-best) and attention beam.
    beam_size: int = 10
    # Attention rescoring: weight of the CTC score, and of the R2L decoder (treated as 0
    # for a model without one, so one set of options serves models with and without it).
    ctc_weight: float = 0.3
    reverse_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.chunk_size != FULL_CONTEXT and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be > 0 (chunked) or -1 (full context), got {self.chunk_size}")
        if self.num_left_chunks < FULL_CONTEXT:
            raise ValueError(f"num_left_chunks must be >= 0 or -1 (all), got {self.num_left_chunks}")
        if self.streaming and self.chunk_size < 1:
            raise ValueError(f"streaming needs chunk_size > 0, got {self.chunk_size}")
        if self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.ctc_weight < 0 or not 0 <= self.reverse_weight <= 1:
            raise ValueError(f"ctc_weight must be >= 0 and reverse_weight in [0, 1], got {self.ctc_weight} "
                             f"and {self.reverse_weight}")

    def mode_name(self, method: str) -> str:
        """A method's name under these options: full-context and chunked results of one run can sit side by side
        (``<method>_chunkC``, then ``_leftL`` with a left limit, ``_streaming`` when streamed)."""
        if self.chunk_size == FULL_CONTEXT:
            return method
        name = f"{method}_chunk{self.chunk_size}"
        if self.num_left_chunks != FULL_CONTEXT:
            name += f"_left{self.num_left_chunks}"
        return name + ("_streaming" if self.streaming else "")
