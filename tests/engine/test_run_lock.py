"""The run lock without training: who is refused, what is taken over, and that only its holder releases it.

Holders are real processes of this machine (a sleeping child, a finished one)
or lock files written as another host's run would leave them.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from moe_asr.engine import run_lock
from moe_asr.engine.run_lock import LOCK_FILE, STALE_S, Holder, RunInUse, RunLock

REPO = Path(__file__).resolve().parents[2]
COMMAND = "launch/train.py --config conf/tiny_moe.yaml --out-dir exp/x"


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _plant(run_dir: Path, holder: Holder, age_s: float = 0.0) -> Path:
    """A lock file as ``holder`` left it, last refreshed ``age_s`` seconds ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps(asdict(holder)))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _holder(pid: int, **changes) -> Holder:
    """A holder on this host with ``pid``, as that process would have written it."""
    return replace(Holder(socket.gethostname(), pid, run_lock._proc_start(pid), run_lock._boot_id(),
                          time.time() - 100, COMMAND, "theirs"), **changes)


def _ours(path: Path) -> bool:
    return json.loads(path.read_text())["pid"] == os.getpid()


def test_a_live_holder_on_this_host_is_refused_however_old_its_heartbeat(tmp_path, sleeper):
    path = _plant(tmp_path / "run", _holder(sleeper.pid), age_s=10 * STALE_S)
    before = path.read_bytes(), path.stat().st_mtime_ns
    with pytest.raises(RunInUse) as e:
        RunLock.acquire(tmp_path / "run", "second")
    message = str(e.value)
    assert f"host {socket.gethostname()} pid {sleeper.pid}" in message and COMMAND in message, message
    assert "\n" not in message
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_FILE]


def _finished_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("case,why", [("dead", "is not running"), ("reused", "is now another process"),
                                      ("rebooted", "rebooted")])
def test_a_gone_holder_on_this_host_is_taken_over(tmp_path, sleeper, caplog, case, why):
    holder = {"dead": lambda: _holder(_finished_pid()),
              "reused": lambda: _holder(sleeper.pid, pid_start="1"),  # the pid now names another process
              "rebooted": lambda: _holder(sleeper.pid, boot_id="an earlier boot")}[case]()
    path = _plant(tmp_path / "run", holder)  # refreshed just now: on its own host that does not matter
    with caplog.at_level(logging.WARNING, logger="moe_asr.train"):
        lock = RunLock.acquire(tmp_path / "run", "second")
    try:
        assert _ours(path)
        warning = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
        assert warning and why in warning[0] and f"pid {holder.pid}" in warning[0], caplog.text
    finally:
        lock.release()
    assert not path.exists()


@pytest.mark.parametrize("age_s,taken", [(STALE_S / 2, False), (STALE_S + 30, True)])
def test_another_hosts_lock_is_stale_once_not_refreshed(tmp_path, age_s, taken):
    path = _plant(tmp_path / "run", _holder(1, host="node-that-is-not-this-one"), age_s)
    if not taken:
        with pytest.raises(RunInUse, match="host node-that-is-not-this-one pid 1"):
            RunLock.acquire(tmp_path / "run", "second")
        return
    lock = RunLock.acquire(tmp_path / "run", "second")
    assert _ours(path)
    lock.release()


@pytest.mark.parametrize("age_s,taken", [(0, False), (STALE_S + 30, True)])
def test_an_unreadable_lock_counts_by_its_age(tmp_path, age_s, taken):
    """A holder that died between creating the file and writing it leaves it empty."""
    path = tmp_path / "run" / LOCK_FILE
    path.parent.mkdir()
    path.write_text("")
    os.utime(path, (time.time() - age_s,) * 2)
    if not taken:
        with pytest.raises(RunInUse, match="being written"):
            RunLock.acquire(tmp_path / "run", "second")
        return
    RunLock.acquire(tmp_path / "run", "second").release()
    assert not path.exists()


def test_the_holder_refreshes_and_releases_only_its_own_lock(tmp_path):
    lost = []
    lock = RunLock.acquire(tmp_path / "run", COMMAND, on_lost=lost.append)
    path = lock.path
    os.utime(path, (1.0, 1.0))
    lock.refresh()
    assert time.time() - path.stat().st_mtime < 60 and not lost
    if os.fork() == 0:  # a DataLoader worker inherits the object: releasing there must not drop the lock
        lock.release()
        os._exit(0)
    os.wait()
    assert _ours(path)
    _plant(tmp_path / "run", _holder(1, host="elsewhere", token="another run"))  # taken over while we lived
    lock.refresh()
    assert len(lost) == 1 and "taken over by another run (host elsewhere pid 1" in lost[0], lost
    lock.release()
    assert path.exists() and json.loads(path.read_text())["token"] == "another run"


def test_a_start_that_ends_early_leaves_no_folder_it_made(tmp_path):
    """A start refused after taking the lock (a config error, say) exits with the out-dir as it was."""
    lock = RunLock.acquire(tmp_path / "new" / "run", COMMAND)
    lock.release()
    assert not (tmp_path / "new" / "run").exists() and (tmp_path / "new").is_dir()


def _contend(run_dir: str, barrier, results) -> None:
    barrier.wait()
    try:
        lock = RunLock.acquire(Path(run_dir), "contender")
    except RunInUse:
        results.put("refused")
        return
    results.put("took")
    time.sleep(3)  # held while the others look
    lock.release()


def test_one_of_many_simultaneous_starts_takes_a_stale_lock(tmp_path):
    _plant(tmp_path / "run", _holder(_finished_pid()))
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path / "run"), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(results.get(timeout=5) for _ in procs) == ["refused"] * 3 + ["took"]


def test_sigterm_releases_the_lock_and_still_ends_the_process(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from moe_asr.engine.run_lock import hold_run_dir; "
            f"hold_run_dir(Path({str(out)!r}), 0); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        assert (out / LOCK_FILE).is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not (out / LOCK_FILE).exists()
