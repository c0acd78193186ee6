"""The breakdown benchmark times modules without changing what they compute, and counts FFN FLOPs right."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.encoder_breakdown import KINDS, build, counted_flops, ffn_flops_per_token, run_once

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_ffn_flops_per_token_counts_the_active_experts():
    # top-2 of 8 experts of the dense FFN's width: twice its FLOPs; the tiny pair has equal active FFNs.
    assert ffn_flops_per_token(build(str(CONF / "small_moe.yaml"))[0]) == 2 * ffn_flops_per_token(
        build(str(CONF / "small_dense.yaml"))[0])
    assert ffn_flops_per_token(build(str(CONF / "tiny_moe.yaml"))[0]) == ffn_flops_per_token(
        build(str(CONF / "tiny_dense.yaml"))[0])


def test_counted_flops_are_the_routed_work_plus_any_padding():
    """WeNet's loop computes only routed rows: the MoE then does exactly its extra FFN work (and the
    router) more than the dense twin; the grouped path may pad expert rows, and padded rows count."""
    moe, dense = build(str(CONF / "small_moe.yaml"))[0], build(str(CONF / "small_dense.yaml"))[0]
    feats, lengths = torch.randn(1, 200, moe.cfg.input_dim), torch.tensor([200])
    with torch.inference_mode():
        grouped = counted_flops(moe, "full", feats, lengths)
        for layer in moe.moe_layers():
            layer.impl = "loop"
        loop = counted_flops(moe, "full", feats, lengths)
        extra = loop - counted_flops(dense, "full", feats, lengths)
        tokens = moe.encoder(feats, lengths, -1)[0].shape[1]
    ffns = 2 * len(moe.encoder.encoders)  # macaron + final FFN per block
    router = 2 * moe.encoder.encoders[0].feed_forward.router.gate.weight.numel()  # 2 FLOPs per multiply-add
    assert extra == ffns * tokens * (2 * (ffn_flops_per_token(moe) - ffn_flops_per_token(dense)) + router)
    assert grouped >= loop


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
