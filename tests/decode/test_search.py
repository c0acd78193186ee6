"""The ``decode`` entry point on the test double: wiring, shared n-best, streaming, errors."""
from __future__ import annotations

import pytest
import torch

from moe_asr.decode.attention import attention_beam_search, attention_rescoring
from moe_asr.decode.ctc import ctc_greedy_search, ctc_prefix_beam_search
from moe_asr.decode.options import DecodeOptions
from moe_asr.decode.search import METHODS, Hypothesis, decode
from tests.decode.decode_doubles import FakeModel


def batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), max(lengths), 80, generator=g)
    return feats, torch.tensor(lengths)


def test_every_method_matches_calling_the_algorithm_directly():
    model = FakeModel(vocab=6)
    feats, lengths = batch([7, 4, 5])
    out = decode(model, feats, lengths, METHODS, DecodeOptions(beam_size=4, ctc_weight=0.5, reverse_weight=0.3))
    assert set(out) == set(METHODS)
    assert all(len(hyps) == 3 and all(isinstance(h, Hypothesis) for h in hyps) for hyps in out.values())

    with torch.no_grad():
        memory, mask = model.encode(feats, lengths)
        logp = model.ctc.log_softmax(memory)
        greedy = ctc_greedy_search(logp, lengths)
        nbest = [ctc_prefix_beam_search(logp[b, :n], 4) for b, n in enumerate(lengths.tolist())]
        rescored = attention_rescoring(model.decoder, memory, mask, nbest, model.sos, model.eos, 0.5, 0.3)
        attention = attention_beam_search(model.decoder, memory, mask, model.sos, model.eos, 4)
    for name, (hyps, scores) in {
        "ctc_greedy_search": greedy,
        "ctc_prefix_beam_search": ([list(nb[0][0]) for nb in nbest], [nb[0][1] for nb in nbest]),
        "attention_rescoring": rescored,
        "attention": attention,
    }.items():
        assert [h.tokens for h in out[name]] == hyps, name
        assert [h.score for h in out[name]] == pytest.approx(scores, abs=1e-6), name


def test_streaming_uses_the_chunk_by_chunk_encoder_and_restores_training_mode():
    model = FakeModel()
    model.train()
    feats, lengths = batch([5, 3])
    out = decode(model, feats, lengths, ["ctc_greedy_search"],
                 DecodeOptions(chunk_size=2, num_left_chunks=1, streaming=True))
    assert model.encoder.chunk_calls == [(2, 1)]
    assert list(out) == ["ctc_greedy_search"]
    assert model.training


def test_bad_arguments_are_rejected():
    model = FakeModel()
    feats, lengths = batch([3])
    with pytest.raises(ValueError, match="unknown decoding method"):
        decode(model, feats, lengths, ["ctc_greedy", "attention"])
    with pytest.raises(ValueError, match="chunk_size > 0"):
        decode(model, feats, lengths, ["attention"], DecodeOptions(streaming=True))
    with pytest.raises(ValueError, match="got 0"):
        decode(model, feats, lengths, ["attention"], DecodeOptions(chunk_size=0))


def test_reverse_weight_is_ignored_without_an_r2l_decoder():
    feats, lengths = batch([6, 4], seed=1)
    without_r2l = FakeModel(has_r2l=False)
    out = decode(without_r2l, feats, lengths, ["attention_rescoring"], DecodeOptions(reverse_weight=0.5))
    expected = decode(without_r2l, feats, lengths, ["attention_rescoring"], DecodeOptions(reverse_weight=0.0))
    assert out == expected
    # With the R2L decoder present the same weight does change the scores.
    with_r2l = FakeModel(has_r2l=True)
    changed = decode(with_r2l, feats, lengths, ["attention_rescoring"], DecodeOptions(reverse_weight=0.5))
    assert [h.score for h in changed["attention_rescoring"]] != [h.score for h in out["attention_rescoring"]]
