"""What a model computes on a fixed batch: encoder outputs (full context and chunked), CTC log-probs, hypotheses.

Shared by the training driver (run on the live, expert-parallel training model)
and the tests (run on the model read back from disk), so both compute the same things.
"""
from __future__ import annotations

import torch
from torch import nn

from moe_asr.decode import decode


def snapshot(model: nn.Module, input_dim: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 60, input_dim, generator=gen)
    lengths = torch.tensor([60, 41])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        enc, mask = model.encode(feats, lengths)
        chunked, _ = model.encode(feats, lengths, chunk_size=4, num_left_chunks=2)
        log_probs = model.ctc.log_softmax(enc)
    hyps = decode(model, feats, lengths, ["ctc_greedy_search", "attention_rescoring"], beam_size=3)
    model.train(was_training)
    return {"enc": enc, "mask": mask, "chunked": chunked, "log_probs": log_probs,
            "hyps": {m: [h.tokens for h in hs] for m, hs in hyps.items()}}


def assert_same(a: dict, b: dict) -> None:
    for key in ("enc", "chunked", "log_probs"):
        valid = a["mask"].squeeze(1)
        torch.testing.assert_close(a[key][valid], b[key][valid], rtol=1e-5, atol=1e-5, msg=key)
    assert a["hyps"] == b["hyps"]
