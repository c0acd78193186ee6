"""Tie a child process's life to its parent's: the ranks to their launcher, DataLoader workers to their rank.

A process whose parent is killed is re-parented (to init or a subreaper) and
lives on unless something tells it to end. The kernel can: ``prctl(PR_SET_PDEATHSIG)``
makes it send a signal when the parent dies. But a parent that dies between the
``fork`` and the child's ``prctl`` call is missed, so the child also checks that
its parent is still the one it expects.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Have the kernel send SIGTERM when our parent exits (Linux ``prctl``; a no-op elsewhere).

    The kernel acts when the parent's thread that started us exits; the
    launchers and DataLoader start their children from their main thread.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass


class EndWithParent:
    """A DataLoader ``worker_init_fn``: the worker ends when the rank that forked it dies.

    torch's own worker watchdog compares the parent pid with the one it reads at
    worker start; a worker forked by a rank that died at that moment reads
    init's pid and would wait on its queue for ever. The rank's pid is taken here,
    in the rank, before the fork.
    """

    def __init__(self) -> None:
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        die_with_parent()
        if os.getppid() != self.parent:  # died before the kernel was asked to watch it
            os._exit(1)
