"""What the recipes' data preparation shares: Kaldi data directories out, every rejected entry counted.

A corpus reader (examples/<recipe>/local/prepare.py) fills a :class:`Prepared` with each set's
utterances and every entry of the corpus it could not use, with a reason; :func:`write` writes
``OUT/<set>/wav.scp`` and ``OUT/<set>/text`` (what ``moe-asr make-shards --data-dir`` and
``moe-asr train-tokenizer --text`` read), ``OUT/skipped.tsv`` (``key<TAB>reason<TAB>detail``)
and prints the summary: utterances per set, then the skips by reason with examples, so no bad
entry of a corpus goes unnoticed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from moe_asr.data.kaldi_text import write_table
from moe_asr.data.manifest import Rejected
from moe_asr.data.stats import skip_summary


@dataclass
class Prepared:
    sets: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)  # set -> key -> (audio, text)
    rejected: list[Rejected] = field(default_factory=list)

    def add(self, set_name: str, key: str, audio: str, text: str) -> None:
        """One usable utterance; a key already used in any set is rejected as a duplicate."""
        if any(key in utts for utts in self.sets.values()):
            self.reject(key, "duplicate key", audio)
        else:
            self.sets.setdefault(set_name, {})[key] = (audio, text)

    def reject(self, key: str, reason: str, detail: str = "") -> None:
        self.rejected.append(Rejected(key, reason, detail))


def write(prepared: Prepared, out: str | Path, tool: str) -> int:
    """Write the data directories and the skip list, print the summary; the utterances written."""
    out = Path(out)
    for name, utts in prepared.sets.items():
        write_table(out / name / "wav.scp", {k: a for k, (a, _) in utts.items()})
        write_table(out / name / "text", {k: t for k, (_, t) in utts.items()})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "skipped.tsv", "w", encoding="utf-8") as f:
        f.writelines(f"{r.key}\t{r.reason}\t{r.detail}\n" for r in prepared.rejected)
    total = sum(len(u) for u in prepared.sets.values())
    print(f"{tool}: {total} utterances -> {out}: "
          + ", ".join(f"{name} {len(utts)}" for name, utts in prepared.sets.items()))
    examples: dict[str, list[str]] = {}
    for r in prepared.rejected:
        examples.setdefault(r.reason, []).append(r.key)
    for line in skip_summary(Counter(r.reason for r in prepared.rejected), examples):
        print(line)
    if prepared.rejected:
        print(f"  every skipped entry: {out / 'skipped.tsv'}")
    return total
