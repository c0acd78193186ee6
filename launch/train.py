"""Training entry point: `deepspeed launch/train.py --config conf/X.yaml --deepspeed_config ds_configs/Y.json`.

Also runs under `torchrun` and as a plain `python launch/train.py ...`; see docs/training.md.
A mistake the user can fix (config, a refused resume, a damaged or refused
checkpoint, a run that diverged, an out-dir another run is writing, a
checkpoint the filesystem would not take) ends with its one-line message on
every rank;
`--debug` shows the traceback.
"""
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's moe_asr before an installed one

import torch.distributed as dist  # noqa: E402

from moe_asr.engine.checkpoint import CheckpointError  # noqa: E402
from moe_asr.run.config import ConfigError  # noqa: E402
from moe_asr.engine.fingerprint import ResumeRefused  # noqa: E402
from moe_asr.engine.loop import NonFiniteError  # noqa: E402
from moe_asr.engine.run_lock import OutDirError, RunInUse  # noqa: E402
from moe_asr.engine.save_guard import CheckpointSaveError  # noqa: E402
from moe_asr.run.files import CheckpointFileError  # noqa: E402
from moe_asr.train import main  # noqa: E402

USER_ERRORS = {ConfigError: "config error", ResumeRefused: "resume refused", CheckpointError: "checkpoint error",
               CheckpointFileError: "checkpoint error", NonFiniteError: "training stopped", RunInUse: "run in use",
               OutDirError: "out-dir error", CheckpointSaveError: "checkpoint not saved"}


def stop(message: str) -> None:
    """Say why on this rank, let the other ranks say it too (they meet the same check), then exit 1.

    Without the meeting, the launcher ends the other ranks as soon as the first exits,
    often before they have printed anything.
    """
    print(message, file=sys.stderr, flush=True)
    if dist.is_initialized():
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        except Exception:  # noqa: BLE001 - a rank that failed otherwise, or a backend without it: exit anyway
            pass
        dist.destroy_process_group()
    sys.exit(1)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except tuple(USER_ERRORS) as e:
        if "--debug" in sys.argv:
            raise
        stop(f"{next(v for k, v in USER_ERRORS.items() if isinstance(e, k))}: {e}")
