"""Recognition as a library: a trained model over many utterances, batched or streamed, every mode timed.

``transcribe`` is the short way (paths in, ``{key: text}`` out);
``recognize`` is what ``moe-asr recognize`` runs (any source, several modes,
skips, references and timings in a ``Results``); ``load_for_decoding`` reads
a model file, a run (optionally averaged) or a checkpoint.
"""
from moe_asr.decode.options import DecodeOptions
from moe_asr.inference.pipeline import Results, load_for_decoding, recognize, transcribe, write_outputs

__all__ = ["DecodeOptions", "Results", "load_for_decoding", "recognize", "transcribe", "write_outputs"]
