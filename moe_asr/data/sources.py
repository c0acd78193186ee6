"""Audio to recognise: WAV paths, a ``wav.scp``, a Kaldi data directory or shards -> (key, waveform, rate, reference).

Each source yields, in input order, an :class:`AudioItem` for every utterance it
could read and a :class:`Skip` for every one it could not (unreadable, empty or
non-finite audio, a corrupt tar member, a duplicate key, ...), so a recogniser
lists every bad utterance instead of stopping at the first. A missing input file
is an error raised when the source is built, before any audio is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from moe_asr.data.audio import AudioError, EmptyAudioError, decode_audio, read_audio
from moe_asr.data.kaldi_text import read_table
from moe_asr.data.manifest import read_kaldi_dir
from moe_asr.data.shards import check_shards_exist, entry_origin, read_shard, read_shard_list
from moe_asr.data.stats import DataStats


@dataclass(frozen=True)
class AudioItem:
    key: str
    wave: np.ndarray       # mono float32 in [-1, 1], at the source's own rate
    sample_rate: int
    text: Optional[str]    # the reference transcript, when the input carries one


@dataclass(frozen=True)
class Skip:
    key: str               # the utterance, or the shard file for a corrupt tar member
    reason: str
    detail: str = ""
    text: Optional[str] = None  # its reference, so a scorer can count the utterance as missed


Item = Union[AudioItem, Skip]


@dataclass(frozen=True)
class _Entry:
    key: str
    path: str
    text: Optional[str] = None
    offset: float = 0.0
    duration: Optional[float] = None


def _checked(key: str, wave: np.ndarray, sample_rate: int, text: Optional[str], origin: str) -> Item:
    if wave.size == 0:
        return Skip(key, "empty audio", f"{origin}: no samples", text)
    if not np.isfinite(wave).all():
        return Skip(key, "non-finite audio", f"{origin}: NaN or Inf samples", text)
    return AudioItem(key, wave, sample_rate, text)


class FileSource:
    """Utterances that are audio files (or segments of them), read one at a time with soundfile."""

    def __init__(self, entries: Sequence[_Entry], skips: Sequence[Skip] = ()):
        self.entries, self.skips = list(entries), list(skips)

    @property
    def count(self) -> int:
        """Utterances listed (read or skipped), for a progress bar."""
        return len(self.entries) + len(self.skips)

    def __iter__(self) -> Iterator[Item]:
        yield from self.skips
        for e in self.entries:
            try:
                wave, sr = read_audio(e.path, e.offset, e.duration)
            except EmptyAudioError as err:
                yield Skip(e.key, "empty audio", str(err), e.text)
                continue
            except AudioError as err:
                yield Skip(e.key, "unreadable audio", str(err), e.text)
                continue
            yield _checked(e.key, wave, sr, e.text, e.path)


def _keyed_files(entries: Sequence[_Entry]) -> FileSource:
    """Keys made from file names must still be Kaldi keys (one field, unique): others are skipped."""
    kept, skips, seen = [], [], set()
    for e in entries:
        if len(e.key.split()) != 1:
            skips.append(Skip(e.key, "invalid key", "a key may not be empty or contain whitespace"))
        elif e.key in seen:
            skips.append(Skip(e.key, "duplicate key", e.path))
        else:
            seen.add(e.key)
            kept.append(e)
    return FileSource(kept, skips)


def wav_files(paths: Sequence[str | Path]) -> FileSource:
    """Audio files named on the command line; each file's name without extension is its key."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such audio file: {', '.join(missing[:5])}"
                                f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}")
    return _keyed_files([_Entry(Path(p).stem, str(p)) for p in paths])


def wav_scp(path: str | Path) -> FileSource:
    """A Kaldi ``wav.scp`` (``key path`` lines; pipe commands are not supported and come out as unreadable)."""
    return FileSource([_Entry(key, value) for key, value in read_table(path).items()])


def data_dir(path: str | Path) -> FileSource:
    """A Kaldi data directory. With ``text`` it is read as ``make-shards`` reads it (``segments``
    honoured, the transcripts become references, utterances without one are skipped); without
    ``text`` only ``wav.scp`` is read."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such data directory")
    if not (path / "text").is_file():
        return wav_scp(path / "wav.scp")
    utts, rejected = read_kaldi_dir(path)
    return FileSource([_Entry(u.key, u.path, u.text, u.offset, u.duration) for u in utts],
                      [Skip(r.key, r.reason, r.detail) for r in rejected])


class _Problems(DataStats):
    """The shard reader reports corrupt members and transcripts here; they become skips, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Skip] = []

    def bad(self, reason: str, key: str, detail: str = "") -> None:
        self.pending.append(Skip(key, reason, detail))

    def drain(self) -> list[Skip]:
        out, self.pending = self.pending, []
        return out


class ShardSource:
    """The utterances of WebDataset shards (``key.wav``/``key.flac`` + ``key.txt``, see docs/data.md), or of
    a WeNet raw data.list (``moe_asr.data.shards.read_shard_list``)."""

    count = None  # unknown until the shards are read

    def __init__(self, list_path: str | Path):
        self.shards = read_shard_list(list_path)
        check_shards_exist(self.shards)

    def __iter__(self) -> Iterator[Item]:
        problems = _Problems()
        for shard in self.shards:
            for sample in read_shard(shard, problems):
                reported = problems.drain()
                yield from reported
                if any(s.key == sample.key for s in reported):
                    continue  # its transcript was not UTF-8: the member is damaged
                yield self._read(entry_origin(shard), sample.key, sample.audio, sample.text)
            yield from problems.drain()

    @staticmethod
    def _read(shard: str, key: str, audio: Optional[bytes], text: Optional[str]) -> Item:
        if audio is None:
            return Skip(key, "missing audio", f"{shard}: no audio member", text)
        try:
            wave, sr = decode_audio(audio)
        except AudioError as err:
            return Skip(key, "unreadable audio", f"{shard}: {err}", text)
        return _checked(key, wave, sr, text, shard)


Source = Union[FileSource, ShardSource]
