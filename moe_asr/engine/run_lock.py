"""One live writer per run directory: rank 0 holds ``<out-dir>/run.lock`` for the run's life.

Two trainings in one out-dir (a Slurm job resubmitted while the old one still
runs) would each write checkpoints, ``latest``, ``checkpoints.json`` and
``metrics.jsonl`` over the other's. The first rank 0 to start creates the
lock file; a second start reads it, finds its holder alive and stops before it
reads or writes anything in the run. A holder that is gone leaves a stale lock,
which the next start takes over with a warning, so a requeued job resumes on
its own.

What it relies on, chosen to hold on the shared filesystems clusters use (NFS
v3/v4, Lustre, GPFS) as on local disks; it uses no ``fcntl``/``flock`` locks,
which NFS setups often lose or refuse:

- ``open(O_CREAT | O_EXCL)`` of the lock file is atomic: of two starts, exactly
  one creates it. The file then holds its holder as JSON: host, pid, the pid's
  start time and the host's boot id, wall-clock start time, command and a
  random token.
- A heartbeat thread refreshes the file's mtime every ``HEARTBEAT_S``
  seconds (the filesystem's clock stamps it), after checking the file still
  holds its token.
- Liveness on the holder's own host is exact: its pid runs and is the same
  process (its start time in ``/proc`` matches, so a reused pid is not
  mistaken for it) on the same boot. From another host it is the heartbeat:
  a lock not refreshed for ``STALE_S`` seconds is stale. That needs the
  hosts' clocks to agree with the file server's to well within ``STALE_S``
  (NTP), and covers NFS attribute caching (up to a minute by default).
- Takeover is an atomic ``rename`` of the stale file out of the way (only one
  of several starts can move a given file; the one that did checks it moved the
  file it judged stale), then the same exclusive create.

The lock is released (the file removed, if it still holds this run's token) when
the process exits normally or by an exception, on SIGTERM (Slurm's scancel,
preemption or time limit, the launchers stopping their ranks) and when the
launcher dies. A SIGKILL, a crash of the host or a rank stuck in a collective
when the SIGKILL follows the SIGTERM leave a stale lock for the next start.
A run whose lock was taken over while it lived (presumed dead: suspended or cut
off from the filesystem for longer than ``STALE_S``) stops at once, so two
writers never go on together. Tools that only read a run (``convert``,
``recognize``) never look at the lock.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist

log = logging.getLogger("moe_asr.train")

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0
_COMMAND_SHOWN = 200  # characters of the holder's command in a refusal


class RunInUse(RuntimeError):
    """Another live run holds the out-dir; the message names it."""


class OutDirError(RuntimeError):
    """The out-dir or its lock file cannot be written; the message names the path and the OS error."""


def _proc_start(pid: int) -> Optional[str]:
    """Start time of ``pid`` (clock ticks after boot, /proc/<pid>/stat field 22); None if gone, a zombie or no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says."""

    host: str
    pid: int
    pid_start: Optional[str]
    boot_id: Optional[str]
    started: float
    command: str
    token: str

    @classmethod
    def me(cls, command: str) -> "Holder":
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _proc_start(pid), _boot_id(), time.time(), command,
                   secrets.token_hex(8))

    def describe(self) -> str:
        command = self.command if len(self.command) <= _COMMAND_SHOWN else self.command[:_COMMAND_SHOWN] + "..."
        started = datetime.fromtimestamp(self.started).isoformat(sep=" ", timespec="seconds")
        return f"host {self.host} pid {self.pid}, started {started}: {command}"

    def gone(self) -> Optional[str]:
        """Why this holder, which ran on this host, is certainly gone; None while it runs."""
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return "its host has rebooted since"
        start = _proc_start(self.pid)
        if start is None and Path("/proc").is_dir():
            return f"pid {self.pid} is not running"
        if start is None:  # no /proc: the pid alone
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return f"pid {self.pid} is not running"
            except PermissionError:
                pass
            return None
        if self.pid_start is not None and start != self.pid_start:
            return f"pid {self.pid} is now another process"
        return None


@dataclass(frozen=True)
class _Seen:
    """A lock file as read: its holder (None when unreadable, e.g. cut short) and what identifies the file."""

    holder: Optional[Holder]
    mtime: float
    identity: tuple[int, int, int]  # inode, size, mtime_ns: a replaced or rewritten file differs

    def stale(self) -> Optional[str]:
        """Why the lock may be taken over; None while its holder may be alive."""
        if self.holder is not None and self.holder.host == socket.gethostname():
            return self.holder.gone()  # exact on its own host, however old its heartbeat
        age = time.time() - self.mtime
        return f"its lock was last refreshed {age:.0f} s ago (stale after {STALE_S:.0f} s)" if age > STALE_S else None


def _read(path: Path) -> Optional[_Seen]:
    """The lock at ``path``, or None when there is none. Opened to read so that NFS revalidates its mtime."""
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = Holder(**json.loads(raw))
    except (ValueError, TypeError):  # being written, or cut short by a crash between create and write
        holder = None
    return _Seen(holder, st.st_mtime, (st.st_ino, st.st_size, st.st_mtime_ns))


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _lost(message: str) -> None:
    """Another run owns the directory now: stop this one at once, from the heartbeat thread."""
    log.error("%s: stopping without a checkpoint", message)
    os._exit(1)


class RunLock:
    """The lock of one run directory, held by this process (rank 0 of a training)."""

    def __init__(self, run_dir: Path, holder: Holder, made_dir: bool,
                 on_lost: Callable[[str], None] = _lost) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.holder = holder
        self.made_dir = made_dir
        self.on_lost = on_lost
        self.pid = os.getpid()  # a forked child (a DataLoader worker) inherits the object, not the lock
        self._stop = threading.Event()

    @classmethod
    def acquire(cls, run_dir: Path, command: str, on_lost: Callable[[str], None] = _lost) -> "RunLock":
        """Take the lock of ``run_dir`` (created if missing) or raise :class:`RunInUse` naming its live holder.

        A stale lock is taken over with a warning. Nothing else in ``run_dir`` is read or written.
        """
        run_dir = Path(run_dir)
        try:
            made_dir = not run_dir.is_dir()
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutDirError(f"cannot create the out-dir {run_dir}: {e.strerror or e}") from None
        me = Holder.me(command)
        lock = cls(run_dir, me, made_dir, on_lost)
        for _ in range(5):  # each round ends in success, a refusal, or a lost race to another start
            try:
                fd = os.open(lock.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    seen = _read(lock.path)
                    if seen is not None:
                        lock._take_over(seen)
                except OSError as e:
                    raise OutDirError(f"cannot read or take over the run lock {lock.path}: {e.strerror or e}") from None
                continue
            except OSError as e:
                raise OutDirError(f"cannot create the run lock {lock.path}: {e.strerror or e}") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(asdict(me)))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                lock.path.unlink(missing_ok=True)
                raise OutDirError(f"cannot write the run lock {lock.path}: {e.strerror or e}") from None
            lock._start()
            return lock
        raise RunInUse(f"{run_dir}: other runs are starting in it at this moment; start one at a time")

    def _take_over(self, seen: _Seen) -> None:
        """Move a stale lock away (atomic rename) and return; raise :class:`RunInUse` if its holder may live."""
        why = seen.stale()
        if why is None:
            who = seen.holder.describe() if seen.holder else "a run whose lock file is being written"
            raise RunInUse(f"{self.run_dir} is being written by another run ({who}; lock {self.path} refreshed "
                           f"{time.time() - seen.mtime:.0f} s ago): wait for it to end, stop it, or pick another "
                           f"--out-dir")
        moved = self.path.with_name(f"{LOCK_FILE}.stale.{self.holder.token}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another start moved it first: look again
        if _identity(moved) != seen.identity:  # it was taken over between our read and our rename: put it back
            os.rename(moved, self.path)
            return
        moved.unlink()
        who = seen.holder.describe() if seen.holder else "an unreadable lock file"
        log.warning("%s: taking over the lock of a run that is gone (%s): %s", self.run_dir, who, why)

    # ------------------------------------------------------------------ while held
    def _start(self) -> None:
        threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True).start()
        atexit.register(self.release)
        _HELD.append(self)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.refresh()

    def refresh(self) -> None:
        """Refresh the mtime if the file is still ours; otherwise the run has been taken over: ``on_lost``."""
        try:
            seen = _read(self.path)
            if seen is not None and seen.holder is not None and seen.holder.token == self.holder.token:
                os.utime(self.path)
                return
        except OSError as e:  # a filesystem hiccup: the next beat tries again
            log.warning("cannot refresh the run lock %s: %s", self.path, e)
            return
        if seen is None:
            self.on_lost(f"the run lock {self.path} was removed while this run held it")
        else:
            who = seen.holder.describe() if seen.holder else "an unreadable lock file"
            self.on_lost(f"the run lock {self.path} was taken over by another run ({who})")

    def release(self) -> None:
        """Remove the lock if it is still this run's; idempotent, and a no-op in a forked child."""
        if self.pid != os.getpid() or self._stop.is_set():
            return
        self._stop.set()
        if self in _HELD:
            _HELD.remove(self)
        seen = _read(self.path)
        if seen is not None and seen.holder is not None and seen.holder.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        if self.made_dir:
            try:
                self.run_dir.rmdir()  # a start refused after creating the out-dir leaves no empty folder
            except OSError:
                pass


_HELD: list[RunLock] = []


def release_held() -> None:
    """Release the lock this process holds; for exits that skip ``atexit`` (``os._exit`` when the launcher is gone)."""
    for lock in list(_HELD):
        lock.release()


def _on_sigterm(previous: Any) -> Callable[[int, Any], None]:
    """A SIGTERM handler that releases the lock, then does what ``previous`` (the handler before) did."""
    def handler(signum: int, frame: Any) -> None:
        release_held()
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # die of SIGTERM as before, now without the lock
    return handler


def hold_run_dir(run_dir: Path, rank: int) -> Optional[RunLock]:
    """Collective: rank 0 takes ``run_dir``'s lock; every rank raises the same error if it cannot.

    Returns rank 0's lock (None on the other ranks). Call it before anything in
    ``run_dir`` is read: a refused start must not even see a half-written checkpoint.
    """
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock.acquire(run_dir, shlex.join(sys.argv))
        except (RunInUse, OutDirError) as e:
            error = e
        except Exception as e:  # noqa: BLE001 - the other ranks wait for an answer: give them one
            error = OutDirError(f"cannot take the run lock of {run_dir}: {type(e).__name__}: {e}")
            error.__cause__ = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise error
    if lock is not None and threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        if previous is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, _on_sigterm(previous))
    return lock
