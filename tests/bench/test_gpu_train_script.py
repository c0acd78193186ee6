"""bench/gpu_train.sh runs the way a GPU machine runs it, proven on CPU (``--cpu``: the tiny config in bf16
ZeRO 1 on DeepSpeed's CPU accelerator): every step under its limit, each writing its own file, from a fresh
checkout's layout; the plan step runs when this checkout has the planner, and the comparison says so when
it has not."""
import json
import math
import subprocess
import sys

import pytest

from tests.bench.test_gpu_script import REPO, _run


def _has_planner() -> bool:
    return subprocess.run([sys.executable, "-m", "moe_asr.cli", "plan", "--help"], cwd=REPO,
                          capture_output=True, timeout=120).returncode == 0


@pytest.mark.slow
def test_gpu_train_script_runs_every_step(tmp_path):
    out = tmp_path / "out"
    steps = [name for name, _, _ in _run("gpu_train.sh", out, tmp_path)]
    planner = _has_planner()
    assert steps == ["env", "train", "plan", "compare"] if planner else ["env", "train", "compare"]

    train = json.loads((out / "train.json").read_text())
    assert (train["precision"], train["zero_stage"], train["device"]) == ("bf16", 1, "cpu")
    assert train["steps"] == 2 and len(train["losses"]) == 3 and all(math.isfinite(x) for x in train["losses"])
    assert train["steps_per_second"] > 0 and train["frames_per_batch"] == 400 and train["peak_allocated"] is None
    assert "| steps | seconds | steps/s |" in (out / "train.md").read_text()

    compare = (out / "compare.md").read_text()
    log = (out / "log.txt").read_text()
    if planner:
        plan = json.loads((out / "plan.json").read_text())
        assert plan["layout"]["frames_per_batch"] == train["frames_per_batch"]   # the same batch, planned
        assert "| peak GPU memory (GiB) | not measured (cpu) |" in compare and "training TFLOP/s" in compare
    else:
        assert "planner missing" in log and "no prediction to compare with" in compare
