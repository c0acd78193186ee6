"""Processes as /proc shows them (Linux), for the tests that check nothing outlives its parent."""
from __future__ import annotations

from pathlib import Path

Proc = tuple[int, str]  # pid and start time: a pid the system reuses is another process


def stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (the name in parentheses may hold spaces)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process(pid: int) -> Proc | None:
    """``pid`` with its start time, or None when it is gone."""
    fields = stat(pid)
    return None if fields is None else (pid, fields[19])


def alive(proc: Proc) -> bool:
    fields = stat(proc[0])
    return fields is not None and fields[19] == proc[1] and fields[0] not in ("Z", "X")


def children() -> dict[int, list[int]]:
    """Every running process's children, by parent pid."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None:
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def descendants(pids: set[int]) -> set[Proc]:
    """Every process below ``pids`` (children, their children, ...), with start times.

    A launcher's ranks may sit in process groups of their own (torchrun), so signalling a
    launcher's group does not reach them: walk the tree instead.
    """
    tree, found, todo = children(), set(), list(pids)
    while todo:
        for child in tree.get(todo.pop(), []):
            proc = process(child)
            if proc is not None and proc not in found:
                found.add(proc)
                todo.append(child)
    return found
