"""Training entry point: `deepspeed launch/train.py --config conf/X.yaml --deepspeed_config ds_configs/Y.json`.

Also runs under `torchrun` and as a plain `python launch/train.py ...`; see docs/training.md.
A mistake the user can fix (config, a refused resume, a damaged checkpoint, a
run that diverged) ends with its one-line message; `--debug` shows the traceback.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's moe_asr before an installed one

from moe_asr.engine.checkpoint import CheckpointError  # noqa: E402
from moe_asr.engine.config import ConfigError  # noqa: E402
from moe_asr.engine.fingerprint import ResumeRefused  # noqa: E402
from moe_asr.engine.loop import NonFiniteError  # noqa: E402
from moe_asr.train import main  # noqa: E402

USER_ERRORS = {ConfigError: "config error", ResumeRefused: "resume refused", CheckpointError: "checkpoint error",
               NonFiniteError: "training stopped"}

if __name__ == "__main__":
    try:
        sys.exit(main())
    except tuple(USER_ERRORS) as e:
        if "--debug" in sys.argv:
            raise
        sys.exit(f"{next(v for k, v in USER_ERRORS.items() if isinstance(e, k))}: {e}")
