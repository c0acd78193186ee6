"""One live writer per run directory, and a checkpoint the disk will not take costs nothing.

Every case is a real 2-rank ZeRO 2, ep_size 2 run of 3 steps (a checkpoint each
step) and ends compared with the same run left alone: the same records in
``metrics.jsonl`` at every step, the same checkpoints listed, and the last
checkpoint's files byte for byte (their manifests' sha256).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from moe_asr.cli import main as moe_asr
from moe_asr.engine.run_lock import LOCK_FILE
from moe_asr.run.layout import INDEX, LATEST, MANIFEST
from tests.engine.conftest import REPO, SMALL_MODEL, data_overrides, read_metrics, run_training, train_cmd
from tests.helpers import require
from tests.processes import alive, descendants

STEPS = 3
TIMING = ("seconds", "frames_per_s")  # wall-clock measurements: the only values two equal runs differ in


def _cmd(corpus, out: Path, port: int) -> list[str]:
    overrides = {**SMALL_MODEL, **data_overrides(corpus), "parallel.ep_size": 2, "train.max_steps": STEPS,
                 "train.log_interval": 1, "train.warmup_steps": 2, "train.checkpoint_interval": 1}
    return train_cmd(corpus, out, str(REPO / "ds_configs/zero2_cpu.json"), overrides, port)


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory) -> Path:
    """The run left alone."""
    out = tmp_path_factory.mktemp("left_alone") / "run"
    run_training(_cmd(small_corpus, out, 29771))
    return out


def _assert_same_run(out: Path, reference: Path) -> None:
    def records(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run)]

    assert records(out) == records(reference)
    index = (out / "checkpoints" / INDEX).read_text()
    assert index == (reference / "checkpoints" / INDEX).read_text()
    last = (out / "checkpoints" / LATEST).read_text()
    assert last == f"step_{STEPS}"
    manifest = json.loads((out / "checkpoints" / last / MANIFEST).read_text())
    assert manifest == json.loads((reference / "checkpoints" / last / MANIFEST).read_text())
    assert not (out / LOCK_FILE).exists()


def _signal_all(launcher: subprocess.Popen, sig: signal.Signals) -> None:
    """``sig`` to every process under the launcher (torchrun puts each rank in a group of its own), then to it.

    The ranks first: a rank that saw its launcher die first would release its lock on the way out (the
    launcher watchdog), where a SIGKILLed run must leave it behind."""
    for pid, start in [*descendants({launcher.pid}), (launcher.pid, None)]:
        if start is None or alive((pid, start)):
            os.kill(pid, sig)


@contextmanager
def _started(cmd: list[str], console: Path) -> Iterator[subprocess.Popen]:
    """A training in the background, killed with its ranks if the test leaves it running."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with console.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _signal_all(proc, signal.SIGKILL)
            proc.wait()


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, console: Path) -> None:
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / LATEST).is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint committed (exit {proc.poll()}):\n{console.read_text()[-4000:]}")
        time.sleep(0.05)


def _snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}


def _no_rank_traceback(stderr: str) -> None:
    # One traceback is torchrun's own report of the failed ranks; a rank's would make two.
    assert stderr.count("Traceback (most recent call last)") <= 1, stderr[-4000:]


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_dir_is_refused(reference, small_corpus, tmp_path):
    out, console = tmp_path / "run", tmp_path / "first.txt"
    with _started(_cmd(small_corpus, out, 29772), console) as first:
        _wait_for_checkpoint(out, first, console)
        _signal_all(first, signal.SIGSTOP)  # the first run holds still, lock and all, while the second starts
        try:
            holder = json.loads((out / LOCK_FILE).read_text())
            before = _snapshot(out)
            second = run_training(_cmd(small_corpus, out, 29773), check=False)
            assert second.returncode != 0, second.stdout[-3000:]
            lines = [line for line in second.stderr.splitlines() if line.startswith("run in use: ")]
            assert len(lines) == 2 and lines[0] == lines[1], second.stderr[-4000:]  # every rank says it
            assert f"{out} is being written by another run (host {holder['host']} pid {holder['pid']}" in lines[0]
            _no_rank_traceback(second.stderr)
            assert _snapshot(out) == before  # nothing read into a write, nothing written
            # A tool that only reads the run needs no lock.
            assert moe_asr(["convert", "ds-to-pt", str(out), "-o", str(tmp_path / "model.pt")]) == 0
        finally:
            _signal_all(first, signal.SIGCONT)
        assert first.wait(300) == 0, console.read_text()[-4000:]
    _assert_same_run(out, reference)


@pytest.mark.slow
def test_a_killed_runs_lock_is_taken_over_and_the_run_resumes(reference, small_corpus, tmp_path):
    out, console = tmp_path / "run", tmp_path / "killed.txt"
    with _started(_cmd(small_corpus, out, 29774), console) as first:
        _wait_for_checkpoint(out, first, console)
        _signal_all(first, signal.SIGKILL)  # every rank at once: nobody releases the lock
        first.wait()
    stale = json.loads((out / LOCK_FILE).read_text())
    deadline = time.monotonic() + 30
    while alive((stale["pid"], stale["pid_start"])):  # SIGKILLed, not yet gone
        assert time.monotonic() < deadline, f"rank 0 (pid {stale['pid']}) outlived SIGKILL"
        time.sleep(0.1)
    again = run_training(_cmd(small_corpus, out, 29775))
    warnings = [line for line in again.stdout.splitlines() if "taking over the lock" in line]
    assert len(warnings) == 1 and f"pid {stale['pid']}" in warnings[0] and "is not running" in warnings[0], \
        again.stdout[-4000:]
    _assert_same_run(out, reference)


@contextmanager
def _small_disk(where: Path, size: int) -> Iterator[Path]:
    where.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                                    str(where)], capture_output=True).returncode == 0
    require(mounted, "root, to mount a small tmpfs (mount -t tmpfs)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.slow
def test_a_save_into_a_full_disk_fails_on_every_rank_and_resumes_exactly(reference, small_corpus, tmp_path):
    one = sum(p.stat().st_size for p in (reference / "checkpoints" / "step_1").iterdir())
    # Room for the first checkpoint, DeepSpeed's recovery scripts and the logs, not for a second checkpoint.
    with _small_disk(tmp_path / "disk", one * 3 // 2 + (256 << 10)) as disk:
        out = disk / "run"
        failed = run_training(_cmd(small_corpus, out, 29776), check=False)
        assert failed.returncode != 0, failed.stdout[-3000:]
        lines = [line for line in failed.stderr.splitlines() if line.startswith("checkpoint not saved: ")]
        assert len(lines) == 2 and lines[0] == lines[1], failed.stderr[-4000:]
        line = lines[0]
        assert f"could not write checkpoint step_2 in {out / 'checkpoints'}: {out / 'checkpoints' / 'step_2'}/" in line
        assert ".pt (rank " in line and "[Errno 28] No space left on device" in line, line
        assert "latest stays step_1" in line, line
        _no_rank_traceback(failed.stderr)
        early = [line for line in failed.stdout.splitlines() if "this save may fail" in line]
        assert early and "the last checkpoint (step_1) took" in early[0], failed.stdout[-3000:]  # warned first
        ckpts = out / "checkpoints"
        assert (ckpts / LATEST).read_text() == "step_1"
        assert [c["tag"] for c in json.loads((ckpts / INDEX).read_text())] == ["step_1"]
        assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_1"]  # the partial step_2 is gone
        assert not list(out.rglob("*.tmp")) and not (out / LOCK_FILE).exists()

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        run_training(_cmd(small_corpus, out, 29777))
        _assert_same_run(out, reference)
