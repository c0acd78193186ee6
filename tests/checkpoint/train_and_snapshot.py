"""launch/train.py, plus: after training, the live model's outputs on a fixed batch go to ``<out-dir>/live.pt``.

Every rank computes them (with ep_size > 1 the experts answer through the
all-to-all, so all ranks must run the same forwards); rank 0 writes the file.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_asr.engine import loop  # noqa: E402
from moe_asr.train import main  # noqa: E402
from tests.checkpoint.snapshot import snapshot  # noqa: E402

_fit = loop.Trainer.fit


def _fit_and_snapshot(self: loop.Trainer) -> None:
    _fit(self)
    result = snapshot(self.tm.model, self.cfg)
    if self.info.is_main:
        torch.save(result, self.out_dir / "live.pt")


loop.Trainer.fit = _fit_and_snapshot

if __name__ == "__main__":
    sys.exit(main())
