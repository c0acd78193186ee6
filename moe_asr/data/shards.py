"""WebDataset tar shards: write them from utterance lists, read them back robustly.

A shard is a plain tar of ``key.txt`` (UTF-8 transcript) and ``key.flac`` or
``key.wav`` (mono 16-bit PCM) per utterance, the two members adjacent, so the
``webdataset`` package and WeNet read it too. The reader here is our own small
tar parser rather than ``tarfile``: on a corrupt header ``tarfile`` silently
ends the archive, losing the rest of the shard, while this one counts the bad
member, resynchronises on the next valid header and carries on.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence

import numpy as np

from moe_asr.data.audio import AUDIO_EXTENSIONS, AudioError, EmptyAudioError, encode_audio, read_audio
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


def read_shard_list(list_path: str | Path) -> list[str]:
    """Shard paths of a list file; relative entries are relative to the list file's folder."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise FileNotFoundError(f"{list_path}: shard list not found")
    base = list_path.parent
    paths = [ln.strip() for ln in list_path.read_text().splitlines() if ln.strip()]
    return [p if os.path.isabs(p) else str(base / p) for p in paths]


def check_shards_exist(paths: Sequence[str]) -> None:
    """Fail before any worker starts, naming the missing files."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"missing shard file(s): {', '.join(missing[:5])}{more}")


# --------------------------------------------------------------------------- reading


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


def iter_tar(f: BinaryIO, name: str, stats: DataStats) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the regular files in a tar stream; corrupt headers are counted and skipped."""
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
        member = long_name or _member_name(block)
        long_name = None
        if kind in (b"0", b"\0"):
            yield member, data


def read_shard(path: str, stats: DataStats) -> Iterator[RawSample]:
    """Group a shard's members by key (``key.ext``) into samples, in file order."""
    try:
        f = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing shard file: {path}") from None
    current: Optional[RawSample] = None
    with f:
        for member, data in iter_tar(f, path, stats):
            base = member.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
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
            elif ext in AUDIO_EXTENSIONS:
                current.audio = data
        if current is not None:
            yield current
