"""launch/train.py, except that rank 1 SIGKILLs itself while writing its second checkpoint.

It dies after DeepSpeed has written its files and before its trainer state and
the commit barrier: the moment a crash leaves a half-written checkpoint.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_asr.engine import checkpoint  # noqa: E402
from moe_asr.train import main  # noqa: E402

_rng_state = checkpoint.rng_state
_saves = 0


def _dying_rng_state():
    global _saves
    _saves += 1
    if _saves == 2 and int(os.environ["RANK"]) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return _rng_state()


checkpoint.rng_state = _dying_rng_state

if __name__ == "__main__":
    sys.exit(main())
