"""CTC greedy search on hand-made paths; prefix beam search against brute force."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from moe_asr.decode.ctc import ctc_greedy_search, ctc_prefix_beam_search
from moe_asr.symbols import BLANK_ID


def one_hot_log_probs(paths: list[list[int]], vocab: int) -> torch.Tensor:
    """``[B, T, V]`` log-probs whose argmax per frame is the given path (padded with token 1)."""
    width = max(len(p) for p in paths)
    logp = torch.full((len(paths), width, vocab), math.log(0.1 / (vocab - 1)))
    for b, path in enumerate(paths):
        for t, tok in enumerate(path + [1] * (width - len(path))):
            logp[b, t, tok] = math.log(0.9)
    return logp


def test_greedy_collapses_repeats_drops_blanks_and_respects_lengths():
    paths = [
        [1, 1, 0, 1, 2, 2, 0],  # blank between repeats keeps both 1s
        [0, 0, 0, 0, 0, 0, 0],  # all blank
        [3, 3, 3, 2, 2, 1, 1],  # repeats collapse
        [2, 0, 0, 2, 3, 3, 3],  # only the first 4 frames count
    ]
    logp = one_hot_log_probs(paths, vocab=4)
    lengths = torch.tensor([7, 7, 7, 4])
    hyps, scores = ctc_greedy_search(logp, lengths)
    assert hyps == [[1, 1, 2], [], [3, 2, 1], [2, 2]]
    assert scores == pytest.approx([7 * math.log(0.9)] * 3 + [4 * math.log(0.9)], abs=1e-5)


def test_greedy_ignores_padding_frames():
    logp = one_hot_log_probs([[1, 2, 2], [2, 0, 0]], vocab=3)
    logp[1, 1:] = torch.randn(2, 3)  # garbage in padding
    hyps, scores = ctc_greedy_search(logp, torch.tensor([3, 1]))
    assert hyps == [[1, 2], [2]]
    assert scores[1] == pytest.approx(math.log(0.9), abs=1e-6)


def brute_force_nbest(log_probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Every alignment of ``[T, V]``, collapsed, probabilities summed per label sequence."""
    T, V = log_probs.shape
    lp = log_probs.double()
    totals: dict[tuple[int, ...], list[float]] = {}
    for path in itertools.product(range(V), repeat=T):
        labels = tuple(tok for i, tok in enumerate(path) if tok != BLANK_ID and (i == 0 or tok != path[i - 1]))
        totals.setdefault(labels, []).append(float(sum(lp[t, tok] for t, tok in enumerate(path))))
    return {labels: float(torch.tensor(s, dtype=torch.float64).logsumexp(0)) for labels, s in totals.items()}


@pytest.mark.parametrize("T,V", [(1, 2), (3, 3), (4, 4), (5, 3), (5, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_beam_search_is_exact_with_a_large_beam(T, V, seed):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(T, V, generator=g) * 2).log_softmax(-1)
    expected = brute_force_nbest(logp)
    nbest = ctc_prefix_beam_search(logp, beam_size=1000)
    assert len(nbest) == len(expected)
    assert [s for _, s in nbest] == sorted((s for _, s in nbest), reverse=True)
    for labels, score in nbest:
        assert score == pytest.approx(expected[labels], abs=1e-5)
    # The probabilities of all label sequences sum to one.
    assert torch.tensor([s for _, s in nbest]).logsumexp(0) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_prefix_beam_search_small_beam_finds_the_top_on_peaked_input(seed):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(5, 4, generator=g) * 6).log_softmax(-1)
    expected = brute_force_nbest(logp)
    best = max(expected, key=expected.get)
    nbest = ctc_prefix_beam_search(logp, beam_size=2)
    assert len(nbest) <= 2
    assert nbest[0][0] == best
    # Alignments through pruned tokens or prefixes are lost, so the score is a lower bound.
    assert nbest[0][1] <= expected[best] + 1e-6


def test_prefix_beam_search_merges_alignments_greedy_would_split():
    # The best single path is "blank blank" (0.36), but the alignments (1,1), (1,0) and (0,1)
    # all collapse to [1]: 0.16 + 0.24 + 0.24 = 0.64.
    logp = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()
    hyps, _ = ctc_greedy_search(logp[None], torch.tensor([2]))
    assert hyps == [[]]
    nbest = ctc_prefix_beam_search(logp, beam_size=2)
    assert nbest[0][0] == (1,)
    assert nbest[0][1] == pytest.approx(math.log(0.64), abs=1e-6)
    assert nbest[1] == ((), pytest.approx(math.log(0.36), abs=1e-6))


def test_prefix_beam_search_empty_input_gives_the_empty_hypothesis():
    assert ctc_prefix_beam_search(torch.zeros(0, 3), beam_size=3) == [((), 0.0)]
