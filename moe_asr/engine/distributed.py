"""Process groups for every way of starting training: deepspeed, torchrun, Slurm, or one plain process.

The launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
a plain ``python launch/train.py`` gets a one-rank world on a free local port.
On CPU the backend is gloo, and DeepSpeed's shared-memory all-reduce op is
switched off before init: it would otherwise be compiled on first use (about
two minutes) for no gain at these sizes.

A launched rank ends when its launcher dies (``end_with_launcher``): a killed
``deepspeed`` or ``torchrun`` would otherwise leave ranks training on, and
writing checkpoints, with nobody to stop them.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NoReturn, Optional

import torch
import torch.distributed as dist

from moe_asr.engine.run_lock import release_held
from moe_asr.run.config import ConfigError
from moe_asr.lifetime import die_with_parent

log = logging.getLogger("moe_asr.train")
# Recorded when the module loads, before the rendezvous: the launcher's pid, to find
# out whether it died before the kernel watched it for us. (A launcher that dies while
# the rank is still importing torch goes unnoticed: a launcher may itself be pid 1.)
_PARENT_AT_START = os.getppid()
WATCH_INTERVAL_S = 2.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parent_of(pid: int) -> Optional[int]:
    """The parent of ``pid`` from /proc (Linux); None when it is gone or /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ...": comm may hold spaces


def _is_deepspeed_node_launcher(pid: int) -> bool:
    """DeepSpeed's per-node launcher: it outlives the ``deepspeed`` runner above it, ranks and all."""
    try:
        return b"deepspeed.launcher.launch" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _launcher_gone(rank: str, pid: int) -> NoReturn:
    """End at once, from any thread: no checkpoint is written, one being written stays partial."""
    log.error("rank %s: the launcher (pid %d) is gone: exiting without a checkpoint", rank, pid)
    release_held()  # os._exit skips atexit: leave no lock behind for the next start
    os._exit(1)


def _watch(watched: list[tuple[int, int]], rank: str) -> None:
    """Every few seconds: has any watched process changed parent (its parent died, it was re-parented)?"""
    me = os.getpid()
    while True:
        time.sleep(WATCH_INTERVAL_S)
        for pid, parent in watched:
            if (os.getppid() if pid == me else _parent_of(pid)) != parent:
                _launcher_gone(rank, parent)


def end_with_launcher() -> None:
    """Make this launched rank exit when its launcher dies, however it dies.

    torchrun starts the ranks itself: on SIGTERM it stops them, on SIGKILL the
    kernel's parent-death signal does. ``deepspeed`` starts a per-node launcher
    (``deepspeed.launcher.launch``) that starts the ranks; that one stops them on
    SIGTERM and is covered by the parent-death signal on SIGKILL, but the
    ``deepspeed`` runner above it dies on either signal without telling it, and
    the ranks would train on: so under it the ranks also watch the runner. A
    watchdog thread polls both parents, and covers systems without ``prctl``.
    """
    rank, launcher = os.environ.get("RANK", "?"), _PARENT_AT_START
    die_with_parent()
    if os.getppid() != launcher:  # it died before the kernel was asked to watch it
        _launcher_gone(rank, launcher)
    watched = [(os.getpid(), launcher)]
    runner = _parent_of(launcher) if _is_deepspeed_node_launcher(launcher) else None
    if runner is not None:
        watched.append((launcher, runner))
    threading.Thread(target=_watch, args=(watched, rank), name="launcher-watchdog", daemon=True).start()


def select_accelerator() -> str:
    """DeepSpeed's accelerator for this process, ``cuda`` when torch sees a GPU, else ``cpu`` (unless
    DS_ACCELERATOR names one). Set before anything asks DeepSpeed for it: DeepSpeed keeps its first answer."""
    return os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU).

    A rank started by a launcher first ties its life to the launcher's; a plain process has none.
    """
    if "RANK" in os.environ:
        end_with_launcher()
    else:
        tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
        if tasks > 1:  # each task would make a world of its own, all writing the same out-dir
            raise ConfigError(f"srun started {tasks} tasks of the training script with no RANK set: each would "
                              f"train alone; run one launcher per node (launch/slurm/train.sbatch) or one task")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    select_accelerator()
    import deepspeed

    if not cuda:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce(values: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the world; a no-op for one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=op)
    return values


def all_reduce_named(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Sum every named tensor over the ranks in one collective; float64 on the CPU, in the shapes given.

    The tensors travel as one flat float64 buffer (counts stay exact below
    2**53) and are split back by the shapes recorded here.
    """
    shapes = {name: t.shape for name, t in tensors.items()}
    flat = all_reduce(torch.cat([t.to(device, torch.float64).reshape(-1) for t in tensors.values()])).cpu()
    parts = flat.split([shape.numel() for shape in shapes.values()])
    return {name: part.view(shape) for (name, shape), part in zip(shapes.items(), parts)}


def barrier() -> None:
    """Wait for every rank; a no-op for one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave the process group once every rank is done: the end of a run that finished.

    Left to the interpreter's teardown, gloo's worker threads can outlive it and end a
    rank that has finished its work in SIGABRT ("terminate called without an active
    exception"), which the launcher reports as a failed run. Not for a failing run: a rank
    still inside a collective would never reach the barrier.
    """
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
