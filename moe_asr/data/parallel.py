"""Process-parallel map for the offline tools (shard writing, CMVN): one task per shard."""
from __future__ import annotations

import multiprocessing
from typing import Callable, Iterator, Sequence, TypeVar

A = TypeVar("A")
R = TypeVar("R")


def parallel_map(fn: Callable[[A], R], tasks: Sequence[A], num_workers: int) -> Iterator[R]:
    """Results in task order; in-process when one worker (or one task) makes processes pointless.

    ``fn`` must be a module-level function (it is sent to forked workers by name).
    """
    if num_workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    with multiprocessing.get_context("fork").Pool(min(num_workers, len(tasks))) as pool:
        yield from pool.imap(fn, tasks)
