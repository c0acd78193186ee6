"""Word (or character) error rate of hypotheses against references, with jiwer's alignment per utterance.

The edit distance and its alignment are jiwer's (``process_words`` /
``process_characters``); this module decides which utterances are scored and
lays the alignment out as Kaldi's ``per_utt`` does. Every reference utterance is
scored: one without a hypothesis counts as an empty hypothesis, so all its
words are deletions (a recogniser that skipped an utterance pays for it).
Hypotheses without a reference cannot be scored; they are listed as extra.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import jiwer

EPSILON = "***"  # Kaldi's align-text mark for "no word on this side"
_OPS = {"equal": "C", "substitute": "S", "delete": "D", "insert": "I"}
# Characters without spaces: CER counts what was said, not where word boundaries fell.
_CHARS = jiwer.Compose([jiwer.RemoveWhiteSpace(replace_by_space=False), jiwer.ReduceToListOfListOfChars()])

Unit = Literal["word", "char"]


@dataclass
class UttAlignment:
    key: str
    ref: list[str]   # aligned columns, EPSILON in the gaps
    hyp: list[str]
    ops: list[str]   # C (correct), S, D, I per column

    def count(self, op: str) -> int:
        return self.ops.count(op)

    def lines(self) -> list[str]:
        """Kaldi ``per_utt`` lines: ref, hyp and op rows with aligned columns, then ``#csid`` counts."""
        widths = [max(len(r), len(h)) for r, h in zip(self.ref, self.hyp)]

        def row(name: str, cells: list[str]) -> str:
            return f"{self.key} {name:<4} {' '.join(c.ljust(w) for c, w in zip(cells, widths))}".rstrip()

        csid = " ".join(str(self.count(op)) for op in "CSID")
        return [row("ref", self.ref), row("hyp", self.hyp), row("op", self.ops), f"{self.key} #csid {csid}"]


@dataclass
class Score:
    unit: Unit
    error_rate: float          # (S + D + I) / reference tokens, jiwer's value
    substitutions: int
    deletions: int
    insertions: int
    ref_tokens: int            # reference words (characters for unit "char")
    utterances: int            # reference utterances scored, missing ones included
    missing: list[str]         # in the reference, not in the hypotheses: scored as all deletions
    extra: list[str]           # in the hypotheses, not in the reference: ignored
    alignments: list[UttAlignment]

    @property
    def metric(self) -> str:
        return "wer" if self.unit == "word" else "cer"

    def summary(self) -> dict:
        """The JSON summary: ``wer``/``ref_words`` for words, ``cer``/``ref_chars`` for characters."""
        return {"metric": self.metric, self.metric: self.error_rate, "substitutions": self.substitutions,
                "deletions": self.deletions, "insertions": self.insertions,
                ("ref_words" if self.unit == "word" else "ref_chars"): self.ref_tokens,
                "utterances": self.utterances, "missing": self.missing, "extra": self.extra}


def _align(key: str, ref: list[str], hyp: list[str], chunks: list[jiwer.AlignmentChunk]) -> UttAlignment:
    out = UttAlignment(key, [], [], [])
    for c in chunks:
        n = max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx)
        for k in range(n):
            out.ref.append(EPSILON if c.type == "insert" else ref[c.ref_start_idx + k])
            out.hyp.append(EPSILON if c.type == "delete" else hyp[c.hyp_start_idx + k])
            out.ops.append(_OPS[c.type])
    return out


def score(refs: Mapping[str, str], hyps: Mapping[str, str], unit: Unit = "word") -> Score:
    """Score every utterance of ``refs`` (sorted by key) against ``hyps``."""
    if not refs:
        raise ValueError("the reference has no utterances")
    keys = sorted(refs)
    ref_texts = [refs[k] for k in keys]
    hyp_texts = [hyps.get(k, "") for k in keys]
    if unit == "word":
        out = jiwer.process_words(ref_texts, hyp_texts)
        rate = out.wer
    else:
        out = jiwer.process_characters(ref_texts, hyp_texts, _CHARS, _CHARS)
        rate = out.cer
    alignments = [_align(k, r, h, c) for k, r, h, c in zip(keys, out.references, out.hypotheses, out.alignments)]
    return Score(unit, rate, out.substitutions, out.deletions, out.insertions,
                 sum(len(r) for r in out.references), len(keys),
                 missing=[k for k in keys if k not in hyps], extra=sorted(k for k in hyps if k not in refs),
                 alignments=alignments)
