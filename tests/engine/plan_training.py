"""launch/train.py that leaves, per rank, the bytes DeepSpeed's ZeRO optimizer holds (``plan_rank_<r>.json`` in
the out-dir), for the comparison with ``moe-asr plan``.

Read at the first optimizer step, expert (``moe`` groups) and non-expert apart: the flat low-precision (or fp32)
parameter buffers, the gradients kept for this rank's partition (``grads_in_partition``, before the step), the
reduction buckets, and after the step the fp32 master partitions and Adam's two moments.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer  # noqa: E402

from moe_asr.train import main  # noqa: E402

_step, _release = DeepSpeedEngine.step, DeepSpeedZeroOptimizer._release_ipg_buffers
_dumped = False
_backward: dict[str, int] = {}  # the buffers of the first backward, read as the backward releases them


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _split(opt, values: list[int]) -> dict[str, int]:
    """Per-group byte counts summed into expert and dense."""
    out = {"expert": 0, "dense": 0}
    for moe, v in zip(opt.is_moe_param_group, values):
        out["expert" if moe else "dense"] += v
    return out


def _measured_release(self: DeepSpeedZeroOptimizer) -> None:
    if not _backward and getattr(self, "grads_in_partition", None) is not None:
        _backward["gradients"] = _nbytes(self.grads_in_partition)
        _backward["buckets"] = sum(_nbytes(b) for bucket in self.ipg_buckets.values() for b in bucket.buffer)
    _release(self)


def _measured_step(self: DeepSpeedEngine, *args, **kwargs):
    global _dumped
    opt = self.optimizer
    before = None
    if not _dumped and self.is_gradient_accumulation_boundary():
        groups = range(len(opt.bit16_groups))
        # grads_in_partition holds every group's in-partition gradients in one buffer, group after group.
        per_group = [sum(p.numel() for p in opt.params_in_partition[i]) * opt.dtype.itemsize for i in groups]
        assert sum(per_group) == _backward["gradients"], (per_group, _backward)
        before = {"parameters": _split(opt, [_nbytes(opt.bit16_groups_flat[i]) for i in groups]),
                  "gradients": _split(opt, per_group), "buckets": _backward["buckets"]}
    result = _step(self, *args, **kwargs)
    if before is not None:
        _dumped = True
        groups = range(len(opt.bit16_groups))
        masters = opt.single_partition_of_fp32_groups
        moments = [sum(_nbytes(opt.optimizer.state[m][k]) for k in ("exp_avg", "exp_avg_sq")) for m in masters]
        dump = {**before, "master_weights": _split(opt, [_nbytes(m) for m in masters]),
                "optimizer_states": _split(opt, moments),
                "group_ranks": [opt.partition_count[i] for i in groups], "moe": list(opt.is_moe_param_group)}
        rank = torch.distributed.get_rank()
        out_dir = Path(sys.argv[sys.argv.index("--out-dir") + 1])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"plan_rank_{rank}.json").write_text(json.dumps(dump))
    return result


DeepSpeedEngine.step = _measured_step
DeepSpeedZeroOptimizer._release_ipg_buffers = _measured_release

if __name__ == "__main__":
    sys.exit(main())
