"""The tests catch the mistakes they are meant to: each one is planted in a copy of the code, and the tests
written for it must fail there.

The copy holds the packages, the tests and what training reads (configs, launcher); ``moe_asr_kernels`` is
its ``kernels/`` folder under the installed name, and the copy comes first on PYTHONPATH, so the copy's
code is what runs (checked before any plant). ``../shared`` (the FSDD audio) is linked beside it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COPIED = ("moe_asr", "tests", "launch", "conf", "ds_configs", "pytest.ini")

# name: ({file: [(anchor, replacement)]}, the tests that must fail)
PLANTS: dict[str, tuple[dict[str, list[tuple[str, str]]], list[str]]] = {
    "R2L decoder trained on targets that are not reversed": (
        {"moe_asr/model/u2pp.py": [("r_targets = reverse_padded(targets, target_lengths)", "r_targets = targets")]},
        ["tests/model/test_u2pp.py::test_loss_is_the_u2pp_combination_of_losses_computed_by_hand"]),
    "no hidden-layer dropout on the CPU paths": (
        {"moe_asr_kernels/cpu.py": [("p = dropout if training else 0.0", "p = 0.0"),
                                    ("rate = dropout if training else 0.0", "rate = 0.0"),
                                    ("if training and dropout > 0:", "if False:")]},
        [f"tests/kernels/test_cpu.py::test_hidden_dropout_in_training_equals_the_loop_under_the_same_mask[{case}]"
         for case in ("16-2-8-small", "300-2-4-sorted", "5-1-4-grouped", "300-2-4-grouped")]),
    "recognize ignores --chunk-size and --num-left-chunks": (
        {"moe_asr/tools/recognize.py": [
            ("DecodeOptions(chunk_size=args.chunk_size, num_left_chunks=args.num_left_chunks,",
             "DecodeOptions(chunk_size=-1, num_left_chunks=-1,")]},
        ["tests/tools/test_recognize.py::test_chunked_and_streaming_results_sit_beside_full_context"]),
    "averaging keeps only the best checkpoint": (
        {"moe_asr/tools/convert.py": [("ms = average(sources)", "ms = average(sources[:1])")],
         "moe_asr/inference/pipeline.py": [
             ('    ms = average(run_checkpoints(path, average_best, "best"))\n',
              '    ms = average(run_checkpoints(path, average_best, "best"))\n'
              '    from dataclasses import replace\n'
              '    from moe_asr.checkpoint import read_model_state\n'
              '    ms = replace(ms, state=read_model_state(ms.extra["averaged"][0]).state)\n')]},
        ["tests/checkpoint/test_convert.py::test_convert_average_writes_the_mean_of_the_named_checkpoints",
         "tests/tools/test_recognize.py::test_average_decodes_the_mean_of_the_best_checkpoints"]),
}


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The copy of the code and the environment that runs it."""
    root = tmp_path_factory.mktemp("mutations")
    code = root / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, code / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, code / name)
    shutil.copytree(REPO / "kernels", code / "moe_asr_kernels", ignore=ignore)
    (root / "shared").symlink_to((REPO / "../shared").resolve())
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONDONTWRITEBYTECODE": "1"}
    where = subprocess.run([sys.executable, "-c", "import moe_asr, moe_asr_kernels; "
                            "print(moe_asr.__file__); print(moe_asr_kernels.__file__)"],
                           cwd=code, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(code) for p in where), f"the copy is not what runs: {where}"
    return code, env


def _plant(code: Path, edits: dict[str, list[tuple[str, str]]]) -> dict[Path, str]:
    """Apply the edits; returns the original texts. Each anchor must occur exactly once."""
    originals = {}
    for name, replacements in edits.items():
        path = code / name
        text = originals.setdefault(path, path.read_text())
        for anchor, replacement in replacements:
            assert text.count(anchor) == 1, f"{name}: the anchor {anchor!r} occurs {text.count(anchor)} times"
            text = text.replace(anchor, replacement)
        path.write_text(text)
    return originals


@pytest.mark.slow
@pytest.mark.parametrize("plant", list(PLANTS))
def test_the_tests_catch_a_planted_mistake(plant, copy):
    code, env = copy
    edits, tests = PLANTS[plant]
    originals = _plant(code, edits)
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests],
                              cwd=code, env=env, capture_output=True, text=True, timeout=900)
    finally:
        for path, text in originals.items():
            path.write_text(text)
    failed = {line.removeprefix("FAILED ").split(" - ")[0] for line in done.stdout.splitlines()
              if line.startswith("FAILED ")}
    assert done.returncode == 1 and failed == set(tests) and "\nERROR " not in done.stdout, \
        f"{plant}: expected every one of {tests} to fail, failed {sorted(failed)}:\n{done.stdout[-6000:]}"
