"""launch/train.py with a model whose loss (POISON_LOSS) or gradient (POISON_GRAD) turns NaN on chosen calls.

The values are comma-separated 1-based counts of training forward calls, or
"all"; only rank POISON_RANK (default 1) is poisoned, so the other ranks must
learn of it through the loop's all-reduced decisions.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_asr.train import main  # noqa: E402
from moe_asr.model.u2pp import U2PPModel  # noqa: E402

_forward = U2PPModel.forward
_calls = 0


def _chosen(name: str) -> bool:
    spec = os.environ.get(name, "")
    return spec == "all" or str(_calls) in spec.split(",")


def _poisoned_forward(self, *args, **kwargs):
    global _calls
    out = _forward(self, *args, **kwargs)
    if not self.training or int(os.environ["RANK"]) != int(os.environ.get("POISON_RANK", 1)):
        return out
    _calls += 1
    if _chosen("POISON_LOSS"):
        out["loss"] = out["loss"] * float("nan")
    if _chosen("POISON_GRAD"):  # finite loss, NaN gradient: d sqrt(x)/dx at 0 is inf, times 0
        p = next(self.parameters())
        out["loss"] = out["loss"] + 0 * torch.sqrt(p.sum() * 0)
    return out


U2PPModel.forward = _poisoned_forward

if __name__ == "__main__":
    sys.exit(main())
