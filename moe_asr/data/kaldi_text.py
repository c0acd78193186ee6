"""Kaldi ``key value`` tables (``text``, ``wav.scp``): one entry a line, the key up to the first whitespace.

Recognition writes its transcripts in this format and scoring reads them back,
so both sides share one reader and one writer. A key listed twice is an error:
which of the two lines counts would be a guess.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping


def read_table(path: str | Path) -> dict[str, str]:
    """``{key: value}`` of a table file; a key alone on its line has the empty value (an empty transcript)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    table: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        key = parts[0]
        if key in table:
            raise ValueError(f"{path}:{n}: key {key!r} listed twice")
        table[key] = parts[1] if len(parts) > 1 else ""
    return table


def write_table(path: str | Path, table: Mapping[str, str]) -> None:
    """Write ``table`` sorted by key (Kaldi's order); an empty value leaves the key alone on its line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for key in sorted(table):
            value = table[key]
            f.write(f"{key} {value}\n" if value else f"{key}\n")
