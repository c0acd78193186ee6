"""Checkpoint writes that fail without breaking the ranks' lockstep, and say why in one line.

DeepSpeed writes with ``torch.save(obj, path)``, whose zip writer reports a
full disk as ``RuntimeError: [enforce fail at inline_container.cc] unexpected
pos`` and, raised on one rank between DeepSpeed's collectives, leaves the
other ranks waiting for ever at its closing barrier. While a checkpoint is
written (:meth:`Writes.through`), every file DeepSpeed writes, and ours, goes
through a file object opened here, so the OS error itself surfaces (no space,
quota, permission, I/O error), and a rank's first failure is recorded instead
of raised: DeepSpeed's save runs to its end on every rank, later writes of that
rank are skipped, and the checkpointer learns every rank's failure in one
collective.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

import torch

log = logging.getLogger("moe_asr.train")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names the file, the OS error and where a resume continues."""


@dataclass(frozen=True)
class WriteFailure:
    rank: int
    path: str
    error: str


def os_error(e: BaseException) -> str:
    """The OS error behind ``e`` (itself, or what it was raised from or during), else ``e`` in one line."""
    seen: set[int] = set()
    todo: list[Optional[BaseException]] = [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return f"[Errno {cur.errno}] {os.strerror(cur.errno)}"
        todo += [cur.__cause__, cur.__context__]
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}"


def _write_file(path: Path, fill: Callable[[BinaryIO], None]) -> None:
    with open(path, "wb") as f:  # a failed write or flush raises its OSError here, at the latest on close
        fill(f)


class _Writer:
    """DeepSpeed's checkpoint engine with its file writes going through :class:`Writes`."""

    def __init__(self, inner: Any, writes: "Writes") -> None:
        self._inner = inner
        self._writes = writes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        zipfile = getattr(self._inner, "zipfile_serialization", True)
        self._writes.write(Path(path), lambda f: torch.save(state_dict, f, _use_new_zipfile_serialization=zipfile))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._writes.run(Path(path), lambda: os.makedirs(path, exist_ok=exist_ok))


class Writes:
    """One rank's writes of one checkpoint: the first failure is kept, later writes are skipped."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.failure: Optional[WriteFailure] = None
        self.exception: Optional[BaseException] = None

    def run(self, path: Path, write: Callable[[], None]) -> None:
        """``write()``, which writes ``path``; a failure is recorded, never raised."""
        if self.failure is not None:
            return
        try:
            write()
        except Exception as e:  # noqa: BLE001 - raised between DeepSpeed's collectives it would hang the others
            self.failure, self.exception = WriteFailure(self.rank, str(path), os_error(e)), e

    def write(self, path: Path, fill: Callable[[BinaryIO], None]) -> None:
        """Write ``path`` through a file object opened here."""
        self.run(path, lambda: _write_file(path, fill))

    def save(self, obj: Any, path: Path) -> None:
        self.write(path, lambda f: torch.save(obj, f))

    def text(self, path: Path, text: str) -> None:
        self.write(path, lambda f: f.write(text.encode()))

    def commit(self, files: dict[Path, str]) -> None:
        """Write each file beside its place (``NAME.tmp``), then move them in, in order.

        A full disk fails while staging, before anything has moved; staged files are removed on failure.
        """
        staged = {path: path.with_name(path.name + ".tmp") for path in files}
        for path, tmp in staged.items():
            self.text(tmp, files[path])
        for path, tmp in staged.items():
            self.run(path, lambda: os.replace(tmp, path))
        if self.failure is not None:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)

    @contextmanager
    def through(self, engine: Any) -> Iterator[None]:
        """While inside, ``engine.save_checkpoint`` writes every file through this object.

        DeepSpeed writes with its checkpoint engine (``save``, ``makedirs``) and,
        for ZeRO, copies its recovery scripts (``_copy_recovery_script``) beside
        them; all three are routed here and put back afterwards.
        """
        inner = engine.checkpoint_engine
        engine.checkpoint_engine = _Writer(inner, self)
        copy_scripts = engine._copy_recovery_script
        engine._copy_recovery_script = lambda save_path: self.run(Path(save_path), lambda: copy_scripts(save_path))
        try:
            yield
        finally:
            engine.checkpoint_engine = inner
            del engine._copy_recovery_script


def failure_message(failures: list[WriteFailure], tag_dir: Path, resume: Optional[str]) -> str:
    """One line for every rank: the first failed file (lowest rank) and its OS error, and what is left."""
    first = min(failures, key=lambda f: f.rank)
    others = [str(f.rank) for f in sorted(failures, key=lambda f: f.rank)[1:]]
    more = f" (rank{'s' if len(others) > 1 else ''} {', '.join(others)} failed too)" if others else ""
    left = (f"latest stays {resume}, where --resume continues" if resume
            else "no complete checkpoint remains, a rerun starts anew with --overwrite")
    return (f"could not write checkpoint {tag_dir.name} in {tag_dir.parent}: {first.path} (rank {first.rank}): "
            f"{first.error}{more}; the partial {tag_dir.name} was removed and {left}: free space (or lower "
            f"train.keep_checkpoints) and rerun")


def warn_if_short(root: Path, last_dir: Path) -> None:
    """Warn when the filesystem of ``root`` has less free space than the last checkpoint took."""
    try:
        needed = sum(p.stat().st_size for p in last_dir.iterdir() if p.is_file())
        st = os.statvfs(root)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < needed:
        log.warning("%s: %.1f MB free, the last checkpoint (%s) took %.1f MB: this save may fail", root,
                    free / 1e6, last_dir.name, needed / 1e6)
