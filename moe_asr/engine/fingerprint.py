"""What a checkpoint was trained as, so a resume can tell what may continue and what may not.

Every checkpoint carries ``fingerprint.json``: the model (its config section,
without the CMVN file path, whose statistics travel in the weights), the
vocabulary (size and a hash of the symbol table, so two swapped ids are seen),
the tokenizer, the layout (ep_size, world size, ZeRO stage, precision) and the
code version. Resuming compares it with the run being started:

* a different model, vocabulary or text normalisation is refused: the weights
  would not mean the same thing (``model.moe.impl``, how the experts are
  computed, may change);
* a different layout is refused with the conversion that does it properly
  (DeepSpeed would place optimizer state on the wrong experts, or crash
  inside the optimizer);
* another code version is only reported.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from moe_asr import __version__
from moe_asr.data.tokenizer import Tokenizer
from moe_asr.run.config import ExperimentConfig, precision, zero_stage
from moe_asr.model.config import comparable
from moe_asr.schema import flatten, to_dict

FILE = "fingerprint.json"
LAYOUT = ("ep_size", "world_size", "zero_stage", "precision")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(cfg: ExperimentConfig, tokenizer: Tokenizer, world_size: int, ds_config: dict) -> dict[str, Any]:
    table = json.dumps(sorted(tokenizer.symbol_table.items()), ensure_ascii=False).encode()
    text = to_dict(cfg.data.tokenizer)  # how transcripts become tokens; the files are hashed instead
    for path in ("symbol_table", "bpe_model"):
        text.pop(path)
    return {"model": comparable(cfg.model), "vocab_size": tokenizer.vocab_size,
            "symbol_table_sha256": _sha256(table),
            "tokenizer": {**text, "sp_model_sha256": _sha256(tokenizer.sp_model) if tokenizer.sp_model else None},
            "ep_size": cfg.parallel.ep_size, "world_size": world_size, "zero_stage": zero_stage(ds_config),
            "precision": precision(ds_config), "code_version": __version__}


def differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved, current)`` for every fingerprint entry that differs (nested keys dotted)."""
    a, b = flatten(saved), flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def check_resume(tag_dir: Path, current: dict, run_dir: Path) -> list[str]:
    """Raise :class:`ResumeRefused` if the checkpoint at ``tag_dir`` cannot continue as ``current``;
    return the notes to log (a code version change)."""
    path = tag_dir / FILE
    if not path.is_file():
        raise ResumeRefused(f"{tag_dir}: no {FILE}; this checkpoint cannot be checked against the run")
    diff = differences(json.loads(path.read_text()), current)
    notes = [f"written by moe-asr {diff.pop('code_version')[0]}, resumed by {__version__}"] \
        if "code_version" in diff else []
    model = {k: v for k, v in diff.items() if k not in LAYOUT}
    if model:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(model.items())[:4])
        raise ResumeRefused(f"{tag_dir}: trained with another model or vocabulary ({shown}); start a new run "
                            f"in another --out-dir, or --overwrite this one")
    if diff:
        shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise ResumeRefused(f"{tag_dir}: written with another layout ({shown}); DeepSpeed cannot reshard it. "
                            f"Continue at the new layout with: moe-asr convert ds-to-pt {run_dir} --tag "
                            f"{tag_dir.name} --with-optimizer -o state.pt, then launch/train.py ... "
                            f"--init-from state.pt --out-dir NEW_DIR")
    return notes


class ResumeRefused(RuntimeError):
    """The run being started cannot continue this checkpoint; the message says why and what to do."""
