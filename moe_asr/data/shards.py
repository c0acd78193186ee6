"""WebDataset tar shards: write them from utterance lists, read them back robustly.

A shard is a plain tar of ``key.txt`` (UTF-8 transcript) and ``key.flac`` or
``key.wav`` (mono 16-bit PCM) per utterance, the two members adjacent, so the
``webdataset`` package and WeNet read it too. The reader here is our own small
tar parser rather than ``tarfile``: on a corrupt header ``tarfile`` silently
ends the archive, losing the rest of the shard, while this one counts the bad
member, resynchronises on the next valid header and carries on.

WeNet's two list formats are read as they are wherever a shard list is: its
shard lists (tar paths, the tars written by its ``tools/make_shard_list.py``;
a member's key is its name up to the *last* dot, as WeNet splits it) and its
raw ``data.list`` (JSON lines ``{"key", "wav", "txt"[, "start", "end"]}`` of
``tools/make_raw_list.py``), each line of which is one entry of the list,
read from its audio file.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence

import numpy as np

from moe_asr.data.audio import (AUDIO_EXTENSIONS, READ_AUDIO_EXTENSIONS, AudioError, EmptyAudioError, encode_audio,
                                read_audio)
from moe_asr.data.manifest import Rejected, Utterance
from moe_asr.data.parallel import parallel_map
from moe_asr.data.stats import DataStats

SHARD_LIST = "shards.list"
_BLOCK = 512


# --------------------------------------------------------------------------- writing


@dataclass
class ShardResult:
    path: Optional[str]
    utterances: int = 0
    seconds: float = 0.0
    rejected: list[Rejected] = field(default_factory=list)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, utts: Sequence[Utterance], fmt: str = "wav") -> ShardResult:
    """Write one shard to ``path`` via a temporary name, so a crash never leaves a half shard behind.

    Utterances whose audio is unreadable, empty or non-finite are left out and
    reported; when none remain, no file is written and ``path`` is None.
    """
    result = ShardResult(str(path))
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for u in utts:
            try:
                wave, sr = read_audio(u.path, u.offset, u.duration)
            except EmptyAudioError as e:
                result.rejected.append(Rejected(u.key, "empty audio", str(e)))
                continue
            except AudioError as e:
                result.rejected.append(Rejected(u.key, "unreadable audio", str(e)))
                continue
            if not np.isfinite(wave).all():
                result.rejected.append(Rejected(u.key, "unreadable audio", f"{u.path}: non-finite samples"))
                continue
            _add_member(tar, f"{u.key}.txt", u.text.encode("utf-8"))
            _add_member(tar, f"{u.key}.{fmt}", encode_audio(wave, sr, fmt))
            result.utterances += 1
            result.seconds += len(wave) / sr
    if result.utterances == 0:
        tmp.unlink()
        result.path = None
    else:
        os.replace(tmp, path)
    return result


def _write_task(task: tuple[str, list[Utterance], str]) -> ShardResult:
    path, utts, fmt = task
    return write_shard(Path(path), utts, fmt)


def write_shards(utts: Sequence[Utterance], out_dir: str | Path, per_shard: int, num_workers: int = 1,
                 fmt: str = "wav", on_done: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
    """Split ``utts`` into shards of ``per_shard`` utterances written by ``num_workers`` processes.

    Writes ``out_dir/shards.list`` (absolute paths, in shard order) and returns
    one result per shard task; ``on_done`` is called as each shard finishes
    (progress bars).
    """
    if fmt not in AUDIO_EXTENSIONS:
        raise ValueError(f"audio format must be one of {AUDIO_EXTENSIONS}, got {fmt!r}")
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(str(out_dir / f"shard-{i // per_shard:06d}.tar"), list(utts[i:i + per_shard]), fmt)
             for i in range(0, len(utts), per_shard)]
    results = []
    for result in parallel_map(_write_task, tasks, num_workers):
        results.append(result)
        if on_done:
            on_done(result)
    write_shard_list([r.path for r in results if r.path], out_dir / SHARD_LIST)
    return results


def write_shard_list(paths: Sequence[str], list_path: str | Path) -> None:
    Path(list_path).write_text("".join(f"{p}\n" for p in paths))


def _locate(path: str, base: Path) -> str:
    """A list's relative path: beside the list when it is there, else from the working directory (where
    WeNet, which opens the paths as written, looks), else beside the list (to be reported missing)."""
    if os.path.isabs(path):
        return path
    if not (base / path).exists() and os.path.exists(path):
        return os.path.abspath(path)
    return str(base / path)


def _raw_entry(line: str, where: str, base: Path) -> str:
    """One line of a WeNet raw data.list as this module's entry: its JSON with the audio path located."""
    try:
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("key"), str) or not isinstance(row.get("wav"), str):
            raise ValueError("needs string fields key and wav")
        entry = {"key": row["key"], "wav": _locate(row["wav"], base), "txt": row.get("txt")}
        if "start" in row or "end" in row:
            entry.update(start=float(row["start"]), end=float(row["end"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a WeNet data.list line ({{\"key\", \"wav\", \"txt\"}}): {e}") from None
    return json.dumps(entry, ensure_ascii=False)


def is_raw_entry(entry: str) -> bool:
    """True for an utterance of a raw data.list, False for a shard path."""
    return entry.startswith("{")


def entry_origin(entry: str) -> str:
    """The file an entry reads: the shard, or a raw data.list utterance's audio file (for messages)."""
    return json.loads(entry)["wav"] if is_raw_entry(entry) else entry


def read_shard_list(list_path: str | Path) -> list[str]:
    """The entries of a list file: shard paths (ours, WeNet's), or the utterances of a WeNet raw data.list.

    A list whose first line is a JSON object is a raw data.list; every line must then be one
    (a line that is not is an error naming the file and line). Relative paths, of shards and of
    audio files alike, are looked up beside the list, then from the working directory.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise FileNotFoundError(f"{list_path}: shard list not found")
    base = list_path.parent
    lines = [(n, ln.strip()) for n, ln in enumerate(list_path.read_text(encoding="utf-8").splitlines(), 1)
             if ln.strip()]
    if lines and is_raw_entry(lines[0][1]):
        return [_raw_entry(line, f"{list_path}:{n}", base) for n, line in lines]
    return [_locate(line, base) for _, line in lines]


def check_shards_exist(paths: Sequence[str]) -> None:
    """Fail before any worker starts, naming the missing files (a raw list's audio files are checked
    as they are read: one missing is a skipped utterance, as a missing member is in a shard)."""
    missing = [p for p in paths if not is_raw_entry(p) and not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"missing shard file(s): {', '.join(missing[:5])}{more}")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardPart:
    """Samples ``offset``, ``offset + stride``, ... of a shard (all of it by default): how the shards that
    do not divide evenly over the ranks are shared out, one slice per rank."""

    path: str
    stride: int = 1
    offset: int = 0


@dataclass
class RawSample:
    key: str
    text: Optional[str]
    audio: Optional[bytes]


def _octal(field_bytes: bytes) -> int:
    if field_bytes[:1] and field_bytes[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field_bytes[1:], "big")
    digits = field_bytes.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _header_ok(block: bytes) -> bool:
    try:
        stored = _octal(block[148:156])
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return stored == unsigned


def _pax_path(data: bytes) -> Optional[str]:
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


def _member_name(block: bytes) -> str:
    name = block[:100].rstrip(b"\0")
    if block[257:265] == b"ustar\x0000":  # POSIX: a path prefix field (GNU tar uses those bytes otherwise)
        prefix = block[345:500].rstrip(b"\0")
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "replace")


def iter_tar(f: BinaryIO, name: str, stats: DataStats,
             skip: Optional[Callable[[str], bool]] = None) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the regular files in a tar stream; corrupt headers are counted and skipped.

    ``skip(member)``, when given and true, seeks over that member's data unread (another rank's sample).
    """
    long_name: Optional[str] = None
    resyncing = False
    while True:
        block = f.read(_BLOCK)
        if len(block) < _BLOCK:
            if block:
                stats.bad("corrupt tar member", name, "truncated header")
            return
        if not _header_ok(block):
            if block.count(0) == _BLOCK:
                if not resyncing:
                    return  # end-of-archive marker
                continue
            if not resyncing:
                stats.bad("corrupt tar member", name, f"bad header at byte {f.tell() - _BLOCK}")
                resyncing = True
            continue
        resyncing = False
        size = _octal(block[124:136])
        kind = block[156:157]
        regular = kind in (b"0", b"\0")
        member = long_name or _member_name(block) if regular else ""
        if regular and skip is not None and skip(member):
            long_name = None
            f.seek(size + (-size % _BLOCK), os.SEEK_CUR)
            continue
        data = f.read(size)
        if len(data) < size:
            stats.bad("corrupt tar member", name, "truncated member data")
            return
        f.read(-size % _BLOCK)
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == b"x":
            long_name = _pax_path(data)
            continue
        long_name = None
        if regular:
            yield member, data


def _read_raw(entry: str) -> RawSample:
    """The utterance of a raw data.list entry: its audio file's bytes, or with start/end (seconds, WeNet's
    segments) that stretch as WAV; audio None when the file is missing, empty bytes when it cannot be cut."""
    row = json.loads(entry)
    if not os.path.isfile(row["wav"]):
        return RawSample(row["key"], row["txt"], None)
    if "start" not in row:
        with open(row["wav"], "rb") as f:
            return RawSample(row["key"], row["txt"], f.read())
    try:
        wave, sr = read_audio(row["wav"], row["start"], row["end"] - row["start"])
    except AudioError:
        return RawSample(row["key"], row["txt"], b"")  # undecodable, or nothing in the stretch
    return RawSample(row["key"], row["txt"], encode_audio(wave, sr, "wav"))


def _key_and_ext(member: str) -> tuple[str, str]:
    """A member's sample key (its base name up to the last dot) and extension."""
    base = member.rsplit("/", 1)[-1]
    key, dot, ext = base.rpartition(".")
    return (key, ext) if dot else (base, "")


def _other_ranks_samples(part: ShardPart) -> Callable[[str], bool]:
    """True for the members of the samples that are not ``part``'s (numbered by key changes, in file order)."""
    last_key: Optional[str] = None
    index = -1

    def skip(member: str) -> bool:
        nonlocal last_key, index
        key = _key_and_ext(member)[0]
        if key != last_key:
            last_key, index = key, index + 1
        return index % part.stride != part.offset

    return skip


def read_shard(path: str | ShardPart, stats: DataStats) -> Iterator[RawSample]:
    """Group a shard's members by key (``key.ext``, the key up to the last dot) into samples, in file order.

    ``path`` may also be one utterance of a raw data.list (:func:`read_shard_list`), yielded as its sample,
    or a :class:`ShardPart`: every ``stride``-th sample only, the others' data never read.
    """
    part = path if isinstance(path, ShardPart) else ShardPart(path)
    path = part.path
    if is_raw_entry(path):
        yield _read_raw(path)
        return
    try:
        f = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing shard file: {path}") from None
    skip = _other_ranks_samples(part) if part.stride > 1 else None
    current: Optional[RawSample] = None
    with f:
        for member, data in iter_tar(f, path, stats, skip):
            key, ext = _key_and_ext(member)
            if current is not None and key != current.key:
                yield current
                current = None
            if current is None:
                current = RawSample(key, None, None)
            if ext == "txt":
                try:
                    current.text = data.decode("utf-8")
                except UnicodeDecodeError:
                    stats.bad("bad transcript", key, "not UTF-8")
            elif ext in READ_AUDIO_EXTENSIONS:
                current.audio = data
        if current is not None:
            yield current
