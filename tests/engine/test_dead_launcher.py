"""Ranks end with their launcher: the top `deepspeed` or `torchrun` process killed (SIGKILL or SIGTERM),
and within seconds no rank (nor any process it started) is left training and writing checkpoints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from moe_asr.engine.checkpoint import Checkpointer
from moe_asr.run.layout import INDEX, LATEST, MANIFEST, trainer_state_file
from tests.engine.conftest import REPO, SMALL_MODEL, data_overrides, train_cmd
from tests.processes import Proc, alive, descendants

GONE_WITHIN_S = 30
START_WITHIN_S = 300


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((v[5:].decode() for v in env if v.startswith(b"RANK=")), None)


def _wait_for_training(out: Path, top: subprocess.Popen, console: Path) -> None:
    """Until a first checkpoint is committed: the ranks are training and have saved."""
    deadline = time.monotonic() + START_WITHIN_S
    while not (out / "checkpoints" / LATEST).is_file():
        if top.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint committed (exit {top.poll()}):\n{console.read_text()[-4000:]}")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,sig,port", [("deepspeed", "SIGKILL", 29681), ("deepspeed", "SIGTERM", 29683),
                                              ("torchrun", "SIGKILL", 29685), ("torchrun", "SIGTERM", 29687)])
def test_ranks_end_with_their_launcher(small_corpus, tmp_path, launcher, sig, port):
    out, console = tmp_path / "run", tmp_path / "console.txt"
    overrides = {**SMALL_MODEL, **data_overrides(small_corpus), "parallel.ep_size": 2, "train.max_steps": 100000,
                 "train.log_interval": 1, "train.checkpoint_interval": 2}
    cmd = train_cmd(small_corpus, out, "ds_configs/zero1_cpu.json", overrides, port, launcher=launcher)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with console.open("w") as f:
        top = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    procs: set[Proc] = set()
    try:
        _wait_for_training(out, top, console)
        procs = descendants({top.pid})
        assert {_rank_of(pid) for pid, _ in procs} >= {"0", "1"}, procs
        os.kill(top.pid, getattr(signal, sig))  # the top process only: its children are not signalled
        top.wait(timeout=GONE_WITHIN_S)
        deadline = time.monotonic() + GONE_WITHIN_S
        while any(alive(p) for p in procs) and time.monotonic() < deadline:
            procs |= descendants({pid for pid, start in procs if alive((pid, start))})  # e.g. CV workers
            time.sleep(0.5)
        left = [pid for pid, start in procs if alive((pid, start))]
        assert not left, f"still running {GONE_WITHIN_S} s after the launcher died: {left}\n" \
                         f"{console.read_text()[-4000:]}"
        # The newest committed checkpoint is whole, whatever was being saved when the ranks ended.
        checkpoints = Checkpointer(out / "checkpoints", 5, 0)
        tag = checkpoints.latest_tag()
        assert tag in [c["tag"] for c in json.loads((checkpoints.root / INDEX).read_text())]
        assert all((checkpoints.root / tag / trainer_state_file(r)).is_file() for r in (0, 1)), tag
        assert (checkpoints.root / tag / MANIFEST).is_file() and checkpoints.resume_point() == tag
        checkpoints.verify(tag)  # every file as its manifest says
    finally:
        for pid, start in procs:
            if alive((pid, start)):
                os.kill(pid, signal.SIGKILL)
        if top.poll() is None:
            top.kill()
            top.wait()
