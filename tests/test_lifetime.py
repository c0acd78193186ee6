"""A DataLoader worker ends with the rank that forked it, even when the rank dies at the fork.

Each test runs a stand-in rank as its own process (the test is its parent), has it
start a worker and die, and checks that the worker, now re-parented, is gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import require
from tests.processes import Proc, alive, process


@pytest.fixture(autouse=True)
def _linux() -> None:
    require(sys.platform.startswith("linux"), "Linux (prctl(PR_SET_PDEATHSIG) and /proc)")


def _wait_gone(proc: Proc, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not alive(proc):
            return True
        time.sleep(0.05)
    return False


def _run_rank(script: str, tmp_path: Path, status: int) -> Proc | None:
    """Run ``script`` as the rank; it writes the worker's pid to ``worker.pid`` and ends with ``status`` (minus
    the signal when killed), not by an exception. None: the worker is gone."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == status, f"the rank ended with {done.returncode}, not {status}:\n{done.stderr[-3000:]}"
    pid_file = tmp_path / "worker.pid"
    end = time.monotonic() + 10
    while not pid_file.is_file() or not pid_file.read_text().strip():
        assert time.monotonic() < end, "the worker never started"
        time.sleep(0.05)
    return process(int(pid_file.read_text()))


def test_worker_of_a_killed_rank_ends_at_once(tmp_path: Path) -> None:
    # The worker sleeps inside its dataset, where torch's own watchdog (which runs
    # between batches) cannot see the rank die: only the parent-death signal ends it.
    worker = _run_rank("""
        import os, signal, sys, time
        from pathlib import Path
        from torch.utils.data import DataLoader, IterableDataset
        from moe_asr.lifetime import EndWithParent

        class Slow(IterableDataset):
            def __iter__(self):
                (Path(sys.argv[1]) / "worker.pid").write_text(str(os.getpid()))
                time.sleep(120)
                yield 0

        it = iter(DataLoader(Slow(), batch_size=None, num_workers=1, worker_init_fn=EndWithParent()))
        while not (Path(sys.argv[1]) / "worker.pid").is_file():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    """, tmp_path, -signal.SIGKILL)
    try:
        assert worker is None or _wait_gone(worker, 5), "the worker outlived its killed rank"
    finally:
        if worker is not None and alive(worker):
            os.kill(worker[0], 9)


def test_worker_forked_as_its_rank_died_exits(tmp_path: Path) -> None:
    # The race the parent-death signal alone misses: the rank is gone before the
    # worker's init runs. The stand-in worker waits for that, then runs the init.
    worker = _run_rank("""
        import os, sys, time, traceback
        from pathlib import Path
        from moe_asr.lifetime import EndWithParent

        init, out = EndWithParent(), Path(sys.argv[1])
        if os.fork() == 0:
            while os.getppid() == init.parent:
                time.sleep(0.01)
            (out / "worker.pid").write_text(str(os.getpid()))
            try:
                init(0)
            except BaseException:
                (out / "raised").write_text(traceback.format_exc())
                os._exit(3)
            (out / "survived").write_text("init returned")
            time.sleep(120)
            os._exit(0)
        os._exit(0)
    """, tmp_path, 0)
    try:
        assert worker is None or _wait_gone(worker, 5), "the worker outlived its rank"
        assert not (tmp_path / "survived").exists()
        assert not (tmp_path / "raised").exists(), f"init raised instead of ending the worker:\n" \
                                                   f"{(tmp_path / 'raised').read_text()}"
    finally:
        if worker is not None and alive(worker):
            os.kill(worker[0], 9)
