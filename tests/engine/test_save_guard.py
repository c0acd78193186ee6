"""A checkpoint write that fails says which OS error it was, and stops that rank's later writes.

``/dev/full`` answers every write with ENOSPC, as a full disk does.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_asr.engine.save_guard import Writes, os_error
from tests.helpers import require

STATE = {"w": torch.zeros(50_000)}  # larger than a write buffer: the disk is hit inside torch.save


def test_torch_save_to_a_path_hides_the_os_error():
    """Why the guard writes through its own file object: torch's zip writer reports ENOSPC as this."""
    require(Path("/dev/full").exists(), "/dev/full (a device that is always full)")
    with pytest.raises(RuntimeError, match="unexpected pos") as e:
        torch.save(STATE, "/dev/full")
    assert "Errno" not in os_error(e.value)


def test_a_full_disk_is_named_and_later_writes_are_skipped(tmp_path):
    require(Path("/dev/full").exists(), "/dev/full (a device that is always full)")
    writes = Writes(rank=3)
    writes.save(STATE, Path("/dev/full"))
    assert writes.failure is not None
    assert (writes.failure.rank, writes.failure.path) == (3, "/dev/full")
    assert writes.failure.error == "[Errno 28] No space left on device"
    writes.text(tmp_path / "after.json", "{}")
    assert not (tmp_path / "after.json").exists()


def test_a_failed_commit_moves_nothing_in(tmp_path):
    (tmp_path / "latest").write_text("step_1")
    writes = Writes(rank=0)
    writes.commit({tmp_path / "latest": "step_2", tmp_path / "missing" / "index.json": "[]"})
    assert writes.failure is not None and writes.failure.error.startswith("[Errno 2] ")
    assert (tmp_path / "latest").read_text() == "step_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # the staged latest.tmp is gone too


def test_an_error_without_an_os_error_is_one_line():
    assert os_error(RuntimeError("first line\nsecond line")) == "RuntimeError: first line"
