"""Counted warnings for bad data: skip, count, log a few, never crash."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping

log = logging.getLogger("moe_asr.data")
# Per reason, log the first few skipped keys with their detail; the rest are
# only counted, and the training loop reports the counts once per epoch, so a
# broken corpus cannot flood the log while every skip stays visible.
_LOG_FIRST = 5

UNEVEN_RANKS = "dropped: uneven ranks"
# Every reason an utterance can be skipped for. A fixed list, so that the
# training loop can sum the counts of all ranks in one tensor and log every
# reason, zeros included, in every record.
SKIP_REASONS = ("corrupt tar member", "bad transcript", "missing audio", "missing transcript", "undecodable audio",
                "empty audio", "no known token", "non-finite features", "filtered: frames out of range",
                "filtered: tokens out of range", "filtered: tokens/frames ratio out of range", UNEVEN_RANKS)


class DataStats:
    """Counts of skipped samples by reason (one of ``SKIP_REASONS``).

    ``log_details``: log the key and detail of the first few bad samples of
    each reason. A loader asks for them on its first pass only: later epochs
    read the same samples again, and their counts are reported per epoch.
    """

    def __init__(self, log_details: bool = True) -> None:
        self.counts: Counter[str] = Counter()
        self.log_details = log_details

    def _count(self, reason: str) -> int:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}: add it to SKIP_REASONS")
        self.counts[reason] += 1
        return self.counts[reason]

    def bad(self, reason: str, key: str, detail: str = "") -> None:
        n = self._count(reason)
        if self.log_details and n <= _LOG_FIRST:
            log.warning("skipped %s (%s%s)%s", key, reason, f": {detail}" if detail else "",
                        "; more of this kind are only counted" if n == _LOG_FIRST else "")

    def filtered(self, reason: str) -> None:
        """An utterance outside the configured limits: counted, not worth a warning."""
        self._count(f"filtered: {reason}")

    def restore(self, counts: Mapping[str, int]) -> None:
        """Continue from saved counts (a resumed epoch replaying its plan)."""
        self.counts = Counter(counts)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


def skip_line(counts: Mapping[str, int]) -> str:
    """``3 (empty audio 2, filtered: frames out of range 1)``: the total, then the reasons that occurred,
    largest first (``0`` alone when nothing was skipped)."""
    present = sorted(((r, n) for r, n in counts.items() if n), key=lambda rn: -rn[1])
    total = sum(n for _, n in present)
    return f"{total} ({', '.join(f'{r} {n}' for r, n in present)})" if present else "0"


def skip_summary(counts: dict[str, int], examples: dict[str, list[str]] | None = None, show: int = 5) -> list[str]:
    """Human lines for a tool's end-of-run summary: one per reason, with a few example keys."""
    lines = []
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        keys = (examples or {}).get(reason, [])[:show]
        more = ", ..." if n > len(keys) and keys else ""
        lines.append(f"  skipped {n:>7} {reason}" + (f" ({', '.join(keys)}{more})" if keys else ""))
    return lines
