"""The test suite's own rules: every test module collects from any directory, and nothing skips under CI."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require

TESTS = Path(__file__).resolve().parent
# The ways a test can skip; only tests/helpers.py:require may use them (it fails instead under CI=true).
SKIPS = re.compile(r"pytest\.skip\(|importorskip|mark\.skip|mark\.xfail|pytest\.xfail\(")


def _test_dirs() -> list[Path]:
    return sorted({p.parent for p in TESTS.rglob("test_*.py")})


def test_every_test_directory_is_a_package():
    """Without __init__.py pytest imports a test module by its bare name with its own folder on sys.path,
    and `from tests...` then works only when something else has put the repository there."""
    for folder in _test_dirs():
        for package in (folder, *folder.parents):
            if package == TESTS.parent:
                break
            assert (package / "__init__.py").is_file(), f"{package} has no __init__.py"


@pytest.mark.slow
@pytest.mark.parametrize("folder", [str(p.relative_to(TESTS.parent)) for p in _test_dirs()])
def test_each_test_directory_collects_alone_from_another_directory(folder, tmp_path):
    """`pytest <folder>` started anywhere: each alone, since a folder collected after a package finds the
    repository on sys.path already."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(TESTS.parent / folder)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    collected = {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}
    modules = {str(p.relative_to(TESTS.parent)) for p in (TESTS.parent / folder).glob("test_*.py")}
    assert modules <= collected, f"collected nothing from {sorted(modules - collected)}"


def test_only_require_skips():
    """A skip elsewhere would pass CI silently when a system piece is missing."""
    for path in TESTS.rglob("*.py"):
        if path.name in ("helpers.py", Path(__file__).name):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not SKIPS.search(line), f"{path}:{n}: skips without tests.helpers.require: {line.strip()}"


def test_require_skips_here_and_fails_under_ci(monkeypatch):
    require(True, "nothing")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="festival is missing"):
        require(False, "festival")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and festival is missing"):
        require(False, "festival")
