"""`moe-asr` alone or with --help lists every subcommand with its one-line help, without importing the tools."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from moe_asr.cli import COMMANDS

PROBE = """
import sys
from moe_asr.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("IMPORTED", sorted(m for m in sys.modules if m.startswith("moe_asr.tools.")))
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_help_lists_every_command_with_its_summary(argv, tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Train, convert, decode, score and export U2++ MoE speech recognizers" in out
    for name, module_name in COMMANDS.items():
        first_line = importlib.import_module(module_name).__doc__.strip().splitlines()[0]
        # argparse wraps long help lines: compare the words, joined over the continuation lines
        assert f"{name} {' '.join(first_line.split())}" in " ".join(out.split()), (name, out)
    assert "IMPORTED []" in out, "the help list imported tool modules"


def test_unknown_command_fails_naming_the_choices(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, "no-such"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "invalid choice: 'no-such'" in done.stderr and "recognize" in done.stderr
