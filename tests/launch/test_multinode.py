"""Multi-node training is the same training: the sbatch scripts on a real two-node Slurm cluster on this machine.

``launch/slurm/local_cluster.sh`` starts slurmctld and two slurmd daemons (nodes n1
and n2, one CPU each). Every run trains the same tiny MoE on 2 ranks with
ep_size 2, so each MoE layer's experts are split over the two ranks: over two
nodes under ``train.sbatch`` (one rank per node, gloo across them). The reference
is one ``deepspeed --num_gpus 2`` run on one node. The ranks, their data and
their seeds are the same wherever they run, so the losses and the weights must
be equal bit for bit: a node that read other data, a rank numbered differently
or experts placed elsewhere would show up here.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from moe_asr.checkpoint import read_model_state
from moe_asr.engine.checkpoint import Checkpointer
from moe_asr.run.layout import MANIFEST
from tests.engine.conftest import REPO, SMALL_MODEL, Corpus, data_overrides, read_metrics, run_training, train_cmd
from tests.helpers import require
from tests.processes import children

HARNESS = REPO / "launch/slurm/local_cluster.sh"
CANNOT_INSTALL = 3  # local_cluster.sh's exit status when Slurm cannot be installed here
DS_CONFIG = "ds_configs/zero2_cpu.json"
CONFIG = "conf/tiny_moe.yaml"
STEPS = 3  # a first job's steps; the resumed job and the reference go on to 2 * STEPS (mid-epoch stop at 3)
JOB_TIMEOUT_S = 300
FAIL_WITHIN_S = 120
CPU_NODES = ["--gpus-per-node=0", "--cpus-per-task=1"]  # what a node without GPUs is asked for
BIN = Path(sys.executable).parent  # deepspeed, torchrun


def _overrides(corpus: Corpus, max_steps: int, checkpoint_interval: int = STEPS) -> dict:
    return {**SMALL_MODEL, **data_overrides(corpus), "parallel.ep_size": 2, "train.max_steps": max_steps,
            "train.log_interval": 1, "train.warmup_steps": 3, "train.checkpoint_interval": checkpoint_interval}


def _train_args(corpus: Corpus, max_steps: int, checkpoint_interval: int = STEPS) -> list[str]:
    """train.py's arguments after the ones the sbatch scripts pass themselves (config, DeepSpeed JSON, out-dir)."""
    cmd = train_cmd(corpus, Path("-"), DS_CONFIG, _overrides(corpus, max_steps, checkpoint_interval), 0,
                    launcher="python")[2:]
    pairs = zip(cmd[::2], cmd[1::2])  # every argument after the script is a flag and its value
    return [x for flag, value in pairs if flag not in ("--config", "--deepspeed_config", "--out-dir")
            for x in (flag, value)]


def _losses(out_dir: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["loss_ctc"], r["loss_l2r"], r["loss_r2l"], r["lr"])
            for r in read_metrics(out_dir) if "loss" in r]


def _assert_same_training(out_dir: Path, reference: Path, steps: int) -> None:
    """Step-for-step equal losses and equal final weights (no tolerance: the same ranks do the same sums)."""
    assert _losses(out_dir) == _losses(reference)[:steps]
    assert [s for s, *_ in _losses(out_dir)] == list(range(1, steps + 1))
    tag = f"step_{steps}"
    ours, theirs = read_model_state(out_dir, tag).state, read_model_state(reference, tag).state
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """The environment that submits to a two-node cluster started for this module and stopped after it."""
    state = Path(tempfile.mkdtemp(prefix="moe-asr-cluster-"))  # under /tmp: the munge user must reach it
    try:
        up = subprocess.run([str(HARNESS), "up", str(state)], capture_output=True, text=True, timeout=900)
        require(up.returncode != CANNOT_INSTALL,
                f"a local Slurm cluster ({(up.stderr.strip().splitlines() or ['?'])[-1]})")
        assert up.returncode == 0, f"local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "PATH": f"{BIN}:{os.environ['PATH']}",
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    finally:
        down = subprocess.run([str(HARNESS), "down", str(state)], capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, f"local_cluster.sh down failed:\n{down.stdout}\n{down.stderr}"
    shutil.rmtree(state)


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory) -> Path:
    """2 * STEPS steps on one node, 2 ranks, checkpoints at STEPS and 2 * STEPS."""
    out = tmp_path_factory.mktemp("multinode") / "one_node"
    run_training(train_cmd(small_corpus, out, DS_CONFIG, _overrides(small_corpus, 2 * STEPS), 29750,
                           launcher="deepspeed"))
    return out


def _job(job_id: str, env: dict[str, str]) -> dict[str, str]:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                          check=True).stdout
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def _finished(job_id: str, env: dict[str, str], timeout: float) -> dict[str, str]:
    """The job's record once it has ended; cancelled and failed on a timeout (never a hang)."""
    deadline = time.monotonic() + timeout
    while (job := _job(job_id, env))["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=env)
            pytest.fail(f"job {job_id} still {job['JobState']} after {timeout:.0f} s")
        time.sleep(0.5)
    return job


def _submit(env: dict[str, str], log: Path, script: str, out_dir: Path, args: list[str], *sbatch: str,
            **variables: str) -> str:
    cmd = ["sbatch", "--parsable", "--output", str(log), *sbatch, *CPU_NODES, f"launch/slurm/{script}",
           CONFIG, DS_CONFIG, str(out_dir), *args]
    return subprocess.run(cmd, cwd=REPO, env={**env, **variables}, capture_output=True, text=True,
                          check=True).stdout.strip().split(";")[0]


def _run_job(env: dict[str, str], log: Path, *submit_args, **variables: str) -> str:
    """Submit, wait, require COMPLETED; returns the job's output."""
    job_id = _submit(env, log, *submit_args, **variables)
    job = _finished(job_id, env, JOB_TIMEOUT_S)
    assert job["JobState"] == "COMPLETED", f"job {job_id} {job['JobState']}:\n{log.read_text()[-6000:]}"
    return log.read_text()


def _nodes_used(output: str) -> list[tuple[str, str]]:
    """The `node N: node_rank R, LAUNCHER pid P` lines train.sbatch prints from each node's task."""
    return sorted(re.findall(r"^node (n\d): node_rank (\d)", output, re.M))


def _two_node(env: dict[str, str], root: Path, corpus: Corpus, name: str, port: int, max_steps: int = STEPS,
              extra: tuple[str, ...] = (), **variables: str) -> tuple[Path, str]:
    out = root / name
    output = _run_job(env, root / f"{name}.out", "train.sbatch", out, [*_train_args(corpus, max_steps), *extra],
                      "--nodes", "2", MASTER_PORT=str(port), **variables)
    assert _nodes_used(output) == [("n1", "0"), ("n2", "1")], output[-4000:]
    return out, output


@pytest.fixture(scope="module")
def deepspeed_two_nodes(cluster, small_corpus, tmp_path_factory) -> tuple[Path, str]:
    """STEPS steps under train.sbatch's default launcher (`deepspeed --no_ssh`), one rank on each node."""
    return _two_node(cluster, tmp_path_factory.mktemp("deepspeed_two_nodes"), small_corpus, "run", 29751)


@pytest.mark.slow
def test_two_nodes_deepspeed_equal_one_node(deepspeed_two_nodes, reference):
    out, output = deepspeed_two_nodes
    assert "launcher: deepspeed" in output and "nnodes=2, num_local_procs=1, node_rank=1" in output
    _assert_same_training(out, reference, STEPS)


@pytest.mark.slow
def test_two_nodes_torchrun_equal_one_node(cluster, small_corpus, reference, tmp_path):
    out, output = _two_node(cluster, tmp_path, small_corpus, "run", 29752, LAUNCHER="torchrun")
    assert "launcher: torchrun" in output
    _assert_same_training(out, reference, STEPS)


@pytest.mark.slow
def test_single_node_script_equals(cluster, small_corpus, reference, tmp_path):
    out = tmp_path / "run"
    output = _run_job(cluster, tmp_path / "run.out", "train_single_node.sbatch", out,
                      _train_args(small_corpus, STEPS), MASTER_PORT="29753", RANKS_PER_NODE="2")
    assert re.search(r"^node n[12]: 2 ranks", output, re.M), output[-4000:]
    _assert_same_training(out, reference, STEPS)


@pytest.mark.slow
def test_resubmitted_job_resumes_the_two_node_run(cluster, deepspeed_two_nodes, small_corpus, reference, tmp_path):
    """A second job with --resume continues at step STEPS + 1, as if the run had never stopped."""
    shutil.copytree(deepspeed_two_nodes[0], tmp_path / "run")
    out, output = _two_node(cluster, tmp_path, small_corpus, "run", 29754, 2 * STEPS, ("--resume",))
    assert f"resumed from step_{STEPS}" in output, output[-4000:]
    _assert_same_training(out, reference, 2 * STEPS)


def _rank_process(launcher: int, rank: str) -> int:
    """The training process of ``rank`` under ``launcher``: the topmost one with RANK=rank (its loader workers
    inherit the variable)."""
    tree, todo = children(), [launcher]
    while todo:
        pid = todo.pop(0)
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
        todo += tree.get(pid, [])
    pytest.fail(f"no process with RANK={rank} under pid {launcher}")


@pytest.mark.slow
def test_a_rank_killed_on_one_node_fails_the_job(cluster, small_corpus, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.out"
    job_id = _submit(cluster, log, "train.sbatch", out, _train_args(small_corpus, 100000, 1), "--nodes", "2",
                     MASTER_PORT="29755")
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (out / "checkpoints" / "latest").is_file():
            assert _job(job_id, cluster)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"no checkpoint after {JOB_TIMEOUT_S} s"
            time.sleep(0.5)
        launcher = int(re.search(r"^node n2: node_rank 1, deepspeed pid (\d+)", log.read_text(), re.M).group(1))
        os.kill(_rank_process(launcher, "1"), signal.SIGKILL)
        job = _finished(job_id, cluster, FAIL_WITHIN_S)
    finally:
        subprocess.run(["scancel", job_id], env=cluster)
    output = log.read_text()
    assert job["JobState"] == "FAILED", f"{job['JobState']}:\n{output[-4000:]}"
    assert "srun: error: n2: task 1: Exited with exit code" in output
    assert re.search(r"STEP \d+\.0 ON n1 CANCELLED AT", output), output[-4000:]
    checkpoints = Checkpointer(out / "checkpoints", 5, 0)
    latest = checkpoints.latest_tag()
    assert (checkpoints.root / latest / MANIFEST).is_file() and checkpoints.resume_point() == latest
    checkpoints.verify(latest)  # every file as its manifest says


@pytest.mark.slow
def test_hostfile_launch_of_two_nodes_without_slurm(small_corpus, reference, tmp_path):
    """`deepspeed --hostfile H --no_ssh --node_rank R`, one launcher per "node", both on this machine."""
    hostfile, out = tmp_path / "hostfile", tmp_path / "run"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    cmd = train_cmd(small_corpus, out, DS_CONFIG, _overrides(small_corpus, STEPS), 0, launcher="python")[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launchers = [subprocess.Popen([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank",
                                   str(node), "--master_addr", "127.0.0.1", "--master_port", "29756", *cmd],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for node in (0, 1)]
    try:
        outputs = [p.communicate(timeout=JOB_TIMEOUT_S)[0] for p in launchers]
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    _assert_same_training(out, reference, STEPS)
