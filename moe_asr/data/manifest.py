"""Utterance lists from a Kaldi data directory or a TSV/JSONL manifest.

Both readers return the usable utterances plus the rejected ones with a reason
(missing transcript, duplicate key, ...), so a tool can report every problem
at the end instead of stopping at the first.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

# A key becomes a tar member name `key.ext`; WebDataset splits names at the first
# dot, so keys must not contain dots, slashes or whitespace.
_VALID_KEY = re.compile(r"^[^./\s]+$")
MANIFEST_COLUMNS = ("id", "path", "text", "duration", "offset")


@dataclass(frozen=True)
class Utterance:
    key: str
    path: str
    text: str
    offset: float = 0.0
    duration: Optional[float] = None


@dataclass(frozen=True)
class Rejected:
    key: str
    reason: str
    detail: str = ""


def _validate(entries: Iterable[tuple[str, Optional[str], Optional[str], float, Optional[float]]]
              ) -> tuple[list[Utterance], list[Rejected]]:
    """Shared checks: key syntax, duplicates, a transcript and an audio path present."""
    utts: list[Utterance] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for key, path, text, offset, duration in entries:
        if not _VALID_KEY.match(key):
            rejected.append(Rejected(key, "invalid key", "keys may not contain '.', '/' or whitespace"))
        elif key in seen:
            rejected.append(Rejected(key, "duplicate key"))
        elif not path:
            rejected.append(Rejected(key, "missing audio", "no audio path"))
        elif text is None or not text.strip():
            rejected.append(Rejected(key, "missing transcript"))
        elif path.rstrip().endswith("|"):
            rejected.append(Rejected(key, "unreadable audio", "pipe commands are not supported: " + path))
        elif duration is not None and duration <= 0:
            rejected.append(Rejected(key, "empty audio", f"duration {duration}"))
        else:
            utts.append(Utterance(key, path, " ".join(text.split()), offset, duration))
        seen.add(key)
    return utts, rejected


def _key_value_lines(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            pairs.append((parts[0], parts[1] if len(parts) > 1 else ""))
    return pairs


def read_kaldi_dir(data_dir: str | Path) -> tuple[list[Utterance], list[Rejected]]:
    """``wav.scp`` + ``text`` (+ ``segments``: then the segment ids are the utterances)."""
    data_dir = Path(data_dir)
    for name in ("wav.scp", "text"):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"{data_dir / name}: a Kaldi data directory needs wav.scp and text")
    wavs = dict(_key_value_lines(data_dir / "wav.scp"))
    texts_list = _key_value_lines(data_dir / "text")
    texts = dict(texts_list)
    # A key with two transcripts is ambiguous: drop it rather than guess.
    twice = {k for k, c in Counter(k for k, _ in texts_list).items() if c > 1}
    rejected = [Rejected(k, "duplicate key", "listed more than once in text") for k in sorted(twice)]
    segments = data_dir / "segments"
    entries = []
    if segments.is_file():
        for line in segments.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                rejected.append(Rejected(parts[0], "bad segment", line.strip()))
                continue
            seg, rec, start, end = parts[0], parts[1], float(parts[2]), float(parts[3])
            entries.append((seg, wavs.get(rec), texts.get(seg), start, end - start))
    else:
        entries = [(key, path, texts.get(key), 0.0, None) for key, path in _key_value_lines(data_dir / "wav.scp")]
    entries = [e for e in entries if e[0] not in twice]
    known = {e[0] for e in entries} | twice
    rejected += [Rejected(k, "missing audio", "in text but not in wav.scp/segments") for k in texts if k not in known]
    utts, bad = _validate(entries)
    return utts, rejected + bad


def _resolve(path: str, base: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else base / p)


def read_manifest(path: str | Path) -> tuple[list[Utterance], list[Rejected]]:
    """TSV (``id path text [duration [offset]]``, optional header line) or JSONL (``.jsonl``/``.json``).

    Relative audio paths are relative to the manifest's folder; times are seconds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    base = path.parent
    entries = []
    rejected: list[Rejected] = []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                entries.append((str(row["id"]), _resolve(str(row["path"]), base) if row.get("path") else None,
                                row.get("text"), float(row.get("offset") or 0.0),
                                None if row.get("duration") is None else float(row["duration"])))
            except (ValueError, KeyError, TypeError) as e:
                rejected.append(Rejected(f"{path.name}:{n}", "bad manifest line", repr(e)))
        utts, bad = _validate(entries)
        return utts, rejected + bad
    if lines and tuple(lines[0].split("\t")[:3]) == MANIFEST_COLUMNS[:3]:
        lines = lines[1:]
    for n, line in enumerate(lines, 1):
        cols = line.split("\t")
        try:
            duration = float(cols[3]) if len(cols) > 3 and cols[3] else None
            offset = float(cols[4]) if len(cols) > 4 and cols[4] else 0.0
        except ValueError as e:
            rejected.append(Rejected(cols[0], "bad manifest line", f"line {n}: {e}"))
            continue
        entries.append((cols[0], _resolve(cols[1], base) if len(cols) > 1 and cols[1] else None,
                        cols[2] if len(cols) > 2 else None, offset, duration))
    utts, bad = _validate(entries)
    return utts, rejected + bad


def write_manifest(utts: Iterable[Utterance], path: str | Path) -> int:
    """TSV with a header; what the example data-prep scripts produce."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(MANIFEST_COLUMNS) + "\n")
        for u in utts:
            dur = "" if u.duration is None else f"{u.duration:.4f}"
            f.write(f"{u.key}\t{u.path}\t{u.text}\t{dur}\t{u.offset:.4f}\n")
            n += 1
    return n
