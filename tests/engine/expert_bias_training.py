"""launch/train.py that leaves, per rank, what the expert-bias tests compare (``choice_bias_rank_<r>.pt``
in the out-dir): every router's expert bias when training ends, and this rank's own routed tokens of
each optimizer step, as counted before the ranks' counts were summed."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_asr.engine.expert_load import ExpertLoad  # noqa: E402
from moe_asr.engine.loop import Trainer  # noqa: E402
from moe_asr.train import main  # noqa: E402

_local: list[torch.Tensor] = []
_end_step, _finish = ExpertLoad.end_step, Trainer._finish


def _counted_end_step(self: ExpertLoad) -> None:
    _local.append(self.step_tokens.clone())
    _end_step(self)


def _dumping_finish(self: Trainer) -> None:
    _finish(self)
    torch.save({"bias": {name: layer.router.choice_bias.clone() for name, layer in self.tm.moe_layers.items()},
                "local_tokens": torch.stack(_local)}, self.out_dir / f"choice_bias_rank_{self.info.rank}.pt")


ExpertLoad.end_step = _counted_end_step
Trainer._finish = _dumping_finish

if __name__ == "__main__":
    sys.exit(main())
