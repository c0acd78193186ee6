"""What a model computes: encoder outputs (full context and chunked) and CTC log-probs on a fixed batch,
and hypotheses on real held-out speech.

Shared by the training driver (run on the live, expert-parallel training model)
and the tests (run on the model read back from disk), so both compute the same things.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moe_asr.data.feature_batches import feature_batches
from moe_asr.data.sources import wav_files
from moe_asr.decode import DecodeOptions, decode
from moe_asr.run.config import ExperimentConfig

FSDD = Path(__file__).resolve().parents[2] / "../shared/data/fsdd/recordings"
WAVS = [FSDD / f"{digit}_george_{i}.wav" for digit in (0, 3, 7) for i in (0, 1)]  # a speaker never trained on
METHODS = ["ctc_greedy_search", "attention_rescoring"]


def snapshot(model: nn.Module, cfg: ExperimentConfig) -> dict:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 60, cfg.model.input_dim, generator=gen)
    lengths = torch.tensor([60, 41])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        enc, mask = model.encode(feats, lengths)
        chunked, _ = model.encode(feats, lengths, chunk_size=4, num_left_chunks=2)
        log_probs = model.ctc.log_softmax(enc)
    hyps = decode(model, feats, lengths, METHODS, DecodeOptions(beam_size=3))
    speech = {m: {} for m in METHODS}
    for batch in feature_batches(wav_files(WAVS), cfg.data.features, 4000, on_skip=print):
        found_by_method = decode(model, batch.feats, batch.feats_lengths, METHODS, DecodeOptions(beam_size=3))
        for method, found in found_by_method.items():
            speech[method].update({key: h.tokens for key, h in zip(batch.keys, found)})
    model.train(was_training)
    return {"enc": enc, "mask": mask, "chunked": chunked, "log_probs": log_probs,
            "hyps": {m: [h.tokens for h in hs] for m, hs in hyps.items()}, "speech": speech}


def assert_same(a: dict, b: dict) -> None:
    for key in ("enc", "chunked", "log_probs"):
        valid = a["mask"].squeeze(1)
        torch.testing.assert_close(a[key][valid], b[key][valid], rtol=1e-5, atol=1e-5, msg=key)
    assert a["hyps"] == b["hyps"]
    assert a["speech"] == b["speech"]
