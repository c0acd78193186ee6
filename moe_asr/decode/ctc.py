"""CTC decoding: greedy search and prefix beam search.

Both work on the CTC head's log-probabilities ``[B, T, V]`` (or ``[T, V]`` for one
utterance) with the blank ``BLANK_ID``. The prefix beam search sums over all
alignments of a label sequence, so its scores are the quantities attention
rescoring combines with the decoders' scores. It can also be resumed frame by
frame (``PrefixBeamSearch``), which is how a streaming decoder gets partial
results after every chunk.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from moe_asr.symbols import BLANK_ID

NBest = list[tuple[tuple[int, ...], float]]
"""Hypotheses best first: (token ids, log probability)."""


def ctc_greedy_search(
    log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = BLANK_ID
) -> tuple[list[list[int]], list[float]]:
    """Best path per utterance: frame-wise argmax, collapse repeats, drop blanks.

    Args:
        log_probs: ``[B, T, V]`` CTC log-probabilities.
        lengths: ``[B]`` valid frames per utterance; frames past it are padding.
        blank: the blank id.

    Returns:
        Token ids per utterance and the log probability of its best path (the
        single alignment, not the sum over alignments).
    """
    best_logp, best_ids = log_probs.max(dim=-1)  # [B, T]
    valid = torch.arange(log_probs.size(1), device=log_probs.device)[None, :] < lengths[:, None]
    path_scores = (best_logp * valid).sum(dim=1)
    hyps = [collapse(ids[:n], blank) for ids, n in zip(best_ids.tolist(), lengths.tolist())]
    return hyps, path_scores.tolist()


def collapse(path: list[int], blank: int = BLANK_ID) -> list[int]:
    """The label sequence of a frame-wise path: a token starts a new label only where it
    differs from the previous frame, so a blank between two equal tokens keeps both."""
    return [tok for i, tok in enumerate(path) if tok != blank and (i == 0 or tok != path[i - 1])]


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = (a, b) if a > b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


class PrefixBeamSearch:
    """CTC prefix beam search that can be resumed: :meth:`advance` over the frames as they come
    (a streaming decoder's chunks), :meth:`nbest` at any point.

    Each prefix keeps two log probabilities: of all alignments of the frames so
    far that collapse to the prefix and end in blank (``pb``) or in its last token
    (``pnb``). Keeping them apart is what lets a repeated token either merge with
    the previous one (after a non-blank) or start a new label (after a blank).
    Per frame only the ``beam_size`` most likely tokens are expanded and only the
    ``beam_size`` best prefixes survive, so with ``beam_size`` at least the vocabulary
    size and the number of possible prefixes the result is exact. Frames are
    processed one at a time, so however they are split into calls the n-best is
    the same.
    """

    def __init__(self, beam_size: int, blank: int = BLANK_ID) -> None:
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.beam_size, self.blank = beam_size, blank
        # prefix -> (log pb, log pnb); the empty prefix starts with all mass on "ends in blank".
        self.beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -math.inf)}

    def advance(self, log_probs: torch.Tensor) -> None:
        """Extend the beams over ``log_probs [T, V]``, the next T valid frames."""
        k = min(self.beam_size, log_probs.size(-1))
        top_logp, top_ids = log_probs.topk(k, dim=-1)
        for frame_logp, frame_ids in zip(top_logp.tolist(), top_ids.tolist()):
            self._frame(frame_logp, frame_ids)

    def _frame(self, frame_logp: list[float], frame_ids: list[int]) -> None:
        nxt: defaultdict[tuple[int, ...], list[float]] = defaultdict(lambda: [-math.inf, -math.inf])
        for prefix, (pb, pnb) in self.beams.items():
            total = _logaddexp(pb, pnb)
            for lp, tok in zip(frame_logp, frame_ids):
                if tok == self.blank:
                    entry = nxt[prefix]
                    entry[0] = _logaddexp(entry[0], total + lp)
                    continue
                extended = nxt[prefix + (tok,)]
                if prefix and tok == prefix[-1]:
                    # Same token again: merges into the prefix unless a blank separated them.
                    same = nxt[prefix]
                    same[1] = _logaddexp(same[1], pnb + lp)
                    extended[1] = _logaddexp(extended[1], pb + lp)
                else:
                    extended[1] = _logaddexp(extended[1], total + lp)
        # A repeat right after a non-blank frame creates its doubled prefix with zero
        # probability; dropping such prefixes keeps them out of the n-best.
        scored = [(_logaddexp(pb, pnb), prefix, (pb, pnb)) for prefix, (pb, pnb) in nxt.items()]
        ranked = sorted((s for s in scored if s[0] > -math.inf), key=lambda s: s[0], reverse=True)
        self.beams = {prefix: probs for _, prefix, probs in ranked[:self.beam_size]}

    def nbest(self) -> NBest:
        """Up to ``beam_size`` (tokens, log probability) pairs over the frames so far, best first."""
        return [(prefix, _logaddexp(pb, pnb)) for prefix, (pb, pnb) in self.beams.items()]


def ctc_prefix_beam_search(
    log_probs: torch.Tensor, beam_size: int, blank: int = BLANK_ID
) -> NBest:
    """N-best label sequences of one utterance by CTC prefix beam search (:class:`PrefixBeamSearch`).

    Args:
        log_probs: ``[T, V]`` CTC log-probabilities of the valid frames only.
        beam_size: prefixes kept (and tokens expanded) per frame.
        blank: the blank id.

    Returns:
        Up to ``beam_size`` (tokens, log probability) pairs, best first.
    """
    search = PrefixBeamSearch(beam_size, blank)
    search.advance(log_probs)
    return search.nbest()
