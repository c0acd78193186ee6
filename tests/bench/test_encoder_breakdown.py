"""The breakdown benchmark times modules without changing what they compute, and counts FFN FLOPs right."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.encoder_breakdown import KINDS, build, ffn_flops_per_token, run_once

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_ffn_flops_per_token_counts_the_active_experts():
    # top-2 of 8 experts of the dense FFN's width: twice its FLOPs; the tiny pair has equal active FFNs.
    assert ffn_flops_per_token(build(str(CONF / "small_moe.yaml"))[0]) == 2 * ffn_flops_per_token(
        build(str(CONF / "small_dense.yaml"))[0])
    assert ffn_flops_per_token(build(str(CONF / "tiny_moe.yaml"))[0]) == ffn_flops_per_token(
        build(str(CONF / "tiny_dense.yaml"))[0])


def test_timed_modules_compute_what_they_did_and_their_shares_fit_in_the_total():
    model, timers = build(str(CONF / "tiny_moe.yaml"))
    plain, _ = build(str(CONF / "tiny_moe.yaml"))  # same seed, same weights, nothing wrapped
    feats, lengths = torch.randn(2, 120, model.cfg.input_dim), torch.tensor([120, 90])
    with torch.inference_mode():
        for context, chunk, left in (("full", -1, -1), ("8/2", 8, 2)):
            timers.seconds.clear()
            start = time.perf_counter()
            run_once(model, context, feats, lengths)
            total = time.perf_counter() - start
            assert set(timers.seconds) == set(KINDS) and all(v > 0 for v in timers.seconds.values())
            assert sum(timers.seconds.values()) < total
            ours = (model.encoder(feats, lengths, -1) if chunk < 0
                    else model.encoder.forward_chunk_by_chunk(feats, lengths, chunk, left))
            ref = (plain.encoder(feats, lengths, -1) if chunk < 0
                   else plain.encoder.forward_chunk_by_chunk(feats, lengths, chunk, left))
            torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
