"""Training entry point: `deepspeed launch/train.py --config conf/X.yaml --deepspeed_config ds_configs/Y.json`.

Also runs under `torchrun` and as a plain `python launch/train.py ...`; see docs/training.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when the package is not installed

from moe_asr.engine.config import ConfigError  # noqa: E402
from moe_asr.train import main  # noqa: E402

if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:  # a config mistake needs its message, not a traceback
        sys.exit(f"config error: {e}")
