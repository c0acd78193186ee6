"""Attention decoding: L2R beam search and attention rescoring of CTC n-best lists.

The decoder is used only through two calls, so any module with this interface works:

- ``decoder.forward_one_step(memory, memory_mask, tgt, tgt_mask, cache) -> (log_probs, cache)``:
  L2R log-probs of the next token after ``tgt`` and the per-layer cache for the prefix.
- ``decoder(memory, memory_mask, ys_in, ys_in_lens, r_ys_in, reverse_weight) -> (l2r_logits,
  r2l_logits, olens)``: teacher-forced logits of both directions.

A hypothesis's decoder score is the sum of its token log probabilities including the
final ``eos``, so hypotheses of different lengths compare fairly on one scale.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

from moe_asr.decode.ctc import NBest
from moe_asr.model.targets import add_sos_eos, reverse_padded
from moe_asr.symbols import IGNORE_ID


class Decoder(Protocol):
    """What decoding needs from the model's (bidirectional) attention decoder."""

    def forward_one_step(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        tgt: torch.Tensor,
        tgt_mask: torch.Tensor,
        cache: Optional[list[torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def __call__(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        ys_in_pad: torch.Tensor,
        ys_in_lens: torch.Tensor,
        r_ys_in_pad: torch.Tensor,
        reverse_weight: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@torch.no_grad()
def attention_beam_search(
    decoder: Decoder,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    sos: int,
    eos: int,
    beam_size: int,
    max_len: Optional[int] = None,
) -> tuple[list[list[int]], list[float]]:
    """Best L2R hypothesis per utterance by beam search, all utterances in one batch.

    Rows are utterances x beams and advance together through the decoder's
    incremental cache. A hypothesis that emitted ``eos`` stays in its beam with a
    frozen score (it may only extend by a free ``eos``), so it competes with the
    live ones until the end. Decoding stops when every beam has ended; a hypothesis
    that reaches its utterance's length limit is forced to end with ``eos``. Since
    scores only decrease as hypotheses grow, with a beam large enough to hold every
    prefix this is exactly the best sequence of at most the limit's length.

    Args:
        memory: ``[B, T, d]`` encoder output.
        memory_mask: ``[B, 1, T]`` bool, True on valid frames.
        sos, eos: start and end ids.
        beam_size: hypotheses kept per utterance.
        max_len: optional cap on hypothesis length; the limit per utterance is its
            number of valid encoder frames, or this cap if smaller.

    Returns:
        Token ids (without sos/eos) and score per utterance.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    batch, device = memory.size(0), memory.device
    rows = batch * beam_size
    limits = memory_mask.squeeze(1).sum(1)
    if max_len is not None:
        limits = limits.clamp(max=max_len)
    row_limits = limits.repeat_interleave(beam_size)
    memory = memory.repeat_interleave(beam_size, dim=0)
    memory_mask = memory_mask.repeat_interleave(beam_size, dim=0)

    hyps = torch.full((rows, 1), sos, dtype=torch.long, device=device)
    # Only the first beam of each utterance is live at the start, so the first
    # expansion does not fill the beam with copies of the same hypothesis.
    scores = torch.full((batch, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0
    scores = scores.view(rows)
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    cache: Optional[list[torch.Tensor]] = None
    for step in range(int(limits.max()) + 1):
        if ended.all():
            break
        tgt_mask = torch.ones(step + 1, step + 1, dtype=torch.bool, device=device).tril()
        logp, cache = decoder.forward_one_step(
            memory, memory_mask, hyps, tgt_mask.expand(rows, -1, -1), cache)
        logp = logp.float()
        only_eos = torch.full_like(logp[0], float("-inf"))
        only_eos[eos] = 0.0
        logp = torch.where(ended[:, None], 0.0, logp)
        forced = ended | (step == row_limits)
        logp = torch.where(forced[:, None], logp + only_eos, logp)

        k = min(beam_size, logp.size(-1))
        top_logp, top_ids = logp.topk(k, dim=-1)  # [rows, k]
        candidates = (scores[:, None] + top_logp).view(batch, beam_size * k)
        best, pick = candidates.topk(beam_size, dim=-1)  # [batch, beam]
        src = (pick // k + torch.arange(batch, device=device)[:, None] * beam_size).view(rows)
        tokens = top_ids.view(batch, beam_size * k).gather(1, pick).view(rows)
        hyps = torch.cat([hyps[src], tokens[:, None]], dim=1)
        cache = [c[src] for c in cache]
        scores = best.view(rows)
        # Unreachable rows (score -inf) count as ended so they cannot prolong the search.
        ended = (tokens == eos) | torch.isneginf(scores)

    best_beam = scores.view(batch, beam_size).argmax(dim=-1)
    out_hyps, out_scores = [], []
    for b, j in enumerate(best_beam.tolist()):
        row = b * beam_size + j
        seq = hyps[row, 1:].tolist()
        out_hyps.append(seq[:seq.index(eos)] if eos in seq else seq)
        out_scores.append(float(scores[row]))
    return out_hyps, out_scores


def score_hypotheses(
    decoder: Decoder,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    hyps: Sequence[Sequence[int]],
    sos: int,
    eos: int,
    reverse_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced L2R and R2L scores of hypotheses in one decoder pass.

    Args:
        memory, memory_mask: ``[N, T, d]`` and ``[N, 1, T]``, one row per hypothesis.
        hyps: N token sequences (without sos/eos).
        reverse_weight: passed to the decoder; 0 skips the R2L decoder and gives
            R2L scores of 0.

    Returns:
        ``[N]`` L2R and ``[N]`` R2L scores: sums of token log probs including eos.
    """
    device = memory.device
    lens = torch.tensor([len(h) for h in hyps], device=device)
    ys = torch.full((len(hyps), max(len(h) for h in hyps)), IGNORE_ID, dtype=torch.long, device=device)
    for i, h in enumerate(hyps):
        ys[i, :len(h)] = torch.tensor(list(h), dtype=torch.long, device=device)
    ys_in, ys_out = add_sos_eos(ys, sos, eos)
    r_ys_in, r_ys_out = add_sos_eos(reverse_padded(ys, lens), sos, eos)
    l2r_logits, r2l_logits, _ = decoder(memory, memory_mask, ys_in, lens + 1, r_ys_in, reverse_weight)

    def total(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = logits.float().log_softmax(dim=-1)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return picked.masked_fill(targets == IGNORE_ID, 0.0).sum(dim=-1)

    l2r = total(l2r_logits, ys_out)
    r2l = total(r2l_logits, r_ys_out) if reverse_weight > 0 else torch.zeros_like(l2r)
    return l2r, r2l


@torch.no_grad()
def attention_rescoring(
    decoder: Decoder,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    nbest: Sequence[NBest],
    sos: int,
    eos: int,
    ctc_weight: float,
    reverse_weight: float,
) -> tuple[list[list[int]], list[float]]:
    """Pick the best of each utterance's CTC n-best by adding the decoders' scores.

    ``score = (1 - reverse_weight) * l2r + reverse_weight * r2l + ctc_weight * ctc``,
    with every hypothesis of every utterance scored in one batched decoder pass.

    Args:
        memory, memory_mask: ``[B, T, d]`` encoder output and ``[B, 1, T]`` mask.
        nbest: per utterance a non-empty list of (tokens, CTC log prob), e.g. from
            :func:`moe_asr.decode.ctc.ctc_prefix_beam_search`.

    Returns:
        The chosen token ids and combined score per utterance.
    """
    counts = [len(nb) for nb in nbest]
    if min(counts) < 1:
        raise ValueError("every utterance needs at least one hypothesis to rescore")
    owner = torch.repeat_interleave(torch.arange(len(nbest), device=memory.device),
                                    torch.tensor(counts, device=memory.device))
    flat = [tokens for nb in nbest for tokens, _ in nb]
    l2r, r2l = score_hypotheses(decoder, memory[owner], memory_mask[owner], flat, sos, eos,
                                reverse_weight)
    ctc = torch.tensor([score for nb in nbest for _, score in nb], device=memory.device)
    combined = (1.0 - reverse_weight) * l2r + reverse_weight * r2l + ctc_weight * ctc
    out_hyps, out_scores = [], []
    start = 0
    for count in counts:
        best = start + int(combined[start:start + count].argmax())
        out_hyps.append(list(flat[best]))
        out_scores.append(float(combined[best]))
        start += count
    return out_hyps, out_scores
