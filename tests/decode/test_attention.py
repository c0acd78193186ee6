"""Attention beam search against exhaustive search; rescoring against hand-summed scores."""
from __future__ import annotations

import pytest
import torch

from moe_asr.decode.attention import attention_beam_search, attention_rescoring, score_hypotheses
from moe_asr.symbols import sos_eos_id
from tests.decode.decode_doubles import FakeDecoder, exhaustive_best, sequence_score

D_MODEL = 6


def random_memory(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder output with large garbage in padded frames, so masking mistakes show."""
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(len(lengths), max(lengths), D_MODEL, generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    memory = torch.where(mask[..., None], memory, 100.0)
    return memory, mask[:, None, :]


@pytest.mark.parametrize("vocab,lengths,seed", [(4, [3, 2], 0), (4, [3, 1, 2], 1), (5, [2, 3], 2)])
def test_beam_search_with_a_large_beam_equals_exhaustive_search(vocab, lengths, seed):
    decoder = FakeDecoder(vocab, D_MODEL, seed=seed)
    sos = eos = sos_eos_id(vocab)
    tokens = [t for t in range(vocab) if t != eos]
    memory, mask = random_memory(lengths, seed)
    # Large enough to keep every prefix of up to max(lengths) tokens alive.
    beam = sum(len(tokens) ** n for n in range(max(lengths) + 1))
    hyps, scores = attention_beam_search(decoder, memory, mask, sos, eos, beam_size=beam)
    for b, n in enumerate(lengths):
        best, best_score = exhaustive_best(decoder, memory[b:b + 1], mask[b:b + 1],
                                           tokens, n, sos, eos)
        assert hyps[b] == best
        assert scores[b] == pytest.approx(best_score, abs=1e-5)


def test_beam_search_max_len_caps_the_hypothesis_length():
    vocab = 4
    sos = eos = sos_eos_id(vocab)
    tokens = [t for t in range(vocab) if t != eos]
    decoder = FakeDecoder(vocab, D_MODEL, seed=3)
    memory, mask = random_memory([6])
    hyps, scores = attention_beam_search(decoder, memory, mask, sos, eos, beam_size=13, max_len=2)
    best, best_score = exhaustive_best(decoder, memory, mask, tokens, 2, sos, eos)
    assert hyps == [best] and scores == pytest.approx([best_score], abs=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
def test_batched_beam_search_equals_decoding_each_utterance_alone(beam):
    vocab = 8
    sos = eos = sos_eos_id(vocab)
    decoder = FakeDecoder(vocab, D_MODEL, seed=4)
    lengths = [6, 3, 5, 1]
    memory, mask = random_memory(lengths, seed=4)
    hyps, scores = attention_beam_search(decoder, memory, mask, sos, eos, beam)
    for b, n in enumerate(lengths):
        alone_hyps, alone_scores = attention_beam_search(
            decoder, memory[b:b + 1, :n], mask[b:b + 1, :, :n], sos, eos, beam)
        assert hyps[b] == alone_hyps[0]
        assert scores[b] == pytest.approx(alone_scores[0], abs=1e-5)
        assert len(hyps[b]) <= n
        # The reported score is the hypothesis's own L2R score including eos.
        assert scores[b] == pytest.approx(
            sequence_score(decoder, memory[b:b + 1], mask[b:b + 1], hyps[b], sos, eos),
            abs=1e-5)


def test_score_hypotheses_matches_step_by_step_scores():
    vocab = 6
    sos = eos = sos_eos_id(vocab)
    decoder = FakeDecoder(vocab, D_MODEL, seed=5)
    memory, mask = random_memory([4, 4, 2, 3], seed=5)
    hyps = [(1, 2, 3), (), (4,), (0, 4)]
    l2r, r2l = score_hypotheses(decoder, memory, mask, hyps, sos, eos, reverse_weight=0.0)
    for i, h in enumerate(hyps):
        assert float(l2r[i]) == pytest.approx(
            sequence_score(decoder, memory[i:i + 1], mask[i:i + 1], h, sos, eos), abs=1e-5)
    assert torch.equal(r2l, torch.zeros(4))


def test_rescoring_matches_hand_computed_scores():
    vocab = 5
    sos = eos = sos_eos_id(vocab)
    # Bigram decoder: log p(next | last) is a [V, V] table per direction.
    decoder = FakeDecoder(vocab, D_MODEL, recurrent=False, memory_scale=0.0, seed=6)
    fwd, bwd = decoder.bigram_log_probs(0), decoder.bigram_log_probs(1)
    memory, mask = random_memory([4, 3], seed=6)
    nbest = [
        [((1, 2), -1.5), ((1,), -2.0), ((), -4.0), ((2, 2, 1), -3.0)],
        [((3,), -0.5), ((3, 1), -0.7)],
    ]
    ctc_weight, reverse_weight = 0.3, 0.5

    def path_sum(table, seq):
        steps = [sos] + list(seq) + [eos]
        return sum(float(table[a, b]) for a, b in zip(steps, steps[1:]))

    chosen_hyps, chosen_scores = attention_rescoring(
        decoder, memory, mask, nbest, sos, eos, ctc_weight, reverse_weight)
    for b, utt in enumerate(nbest):
        expected = {seq: (1 - reverse_weight) * path_sum(fwd, seq)
                    + reverse_weight * path_sum(bwd, seq[::-1]) + ctc_weight * ctc
                    for seq, ctc in utt}
        best = max(expected, key=expected.get)
        assert chosen_hyps[b] == list(best)
        assert chosen_scores[b] == pytest.approx(expected[best], abs=1e-5)


def test_rescoring_without_reverse_weight_uses_l2r_and_ctc_only():
    vocab = 5
    decoder = FakeDecoder(vocab, D_MODEL, recurrent=False, memory_scale=0.0, seed=7)
    fwd = decoder.bigram_log_probs(0)
    memory, mask = random_memory([3])
    nbest = [[((1,), -1.0), ((2,), -0.2), ((1, 3), -2.5)]]
    hyps, scores = attention_rescoring(decoder, memory, mask, nbest, 4, 4,
                                       ctc_weight=0.5, reverse_weight=0.0)
    expected = {seq: sum(float(fwd[a, b]) for a, b in zip((4,) + seq, seq + (4,))) + 0.5 * ctc
                for seq, ctc in nbest[0]}
    best = max(expected, key=expected.get)
    assert hyps == [list(best)] and scores == pytest.approx([expected[best]], abs=1e-5)


def test_rescoring_rejects_an_empty_nbest():
    decoder = FakeDecoder(5, D_MODEL)
    memory, mask = random_memory([3, 3])
    with pytest.raises(ValueError, match="at least one hypothesis"):
        attention_rescoring(decoder, memory, mask, [[((1,), -1.0)], []], 4, 4, 0.3, 0.5)
