"""Reading any ``.pt`` of a run, a checkpoint or a model file without running code from it.

``torch.load(weights_only=True)`` plus an allowlist, :data:`SAFE_GLOBALS`, of the
few plain-data types our runs and DeepSpeed 0.19.8 write beyond tensors and
containers; anything else a file names is refused, naming the file and the name,
before the file is unpickled.
"""
from __future__ import annotations

import importlib
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch


class CheckpointFileError(ValueError):
    """A file :func:`load_file` refuses (unpickling it could run code) or cannot read; the message names it."""


def _numpy_arrays() -> list[Any]:
    """NumPy arrays of numbers: the RNG states in ``trainer_state_rank_*.pt`` and in a file's training state."""
    import numpy as np

    rebuild = np.empty(0).__reduce__()[0]  # numpy.core.multiarray._reconstruct, numpy._core... since NumPy 2
    numeric = {type(np.dtype(c)) for c in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]}
    return [(rebuild, "numpy.core.multiarray._reconstruct"), (rebuild, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, *numeric]


DEEPSPEED_OBJECTS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def _deepspeed_objects() -> list[Any]:
    """The plain-data objects DeepSpeed 0.19.8 writes into ZeRO 1/2 optimizer files (loss scaler, stage, slices).

    Resolved by name, and only when a file names one: unpickling such an object needs its class, so
    reading an optimizer file needs DeepSpeed installed, while reading a model never imports it.
    """
    classes = []
    for name in DEEPSPEED_OBJECTS:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    return classes


# Everything a file may name beyond tensors and plain containers, by the name its pickle gives, and the
# group that allows it: each is rebuilt from plain data without running anything the file supplies. A
# group is imported only when a file names one of its members (reading a model must not import DeepSpeed).
SAFE_GLOBALS: dict[str, Callable[[], list[Any]]] = {
    "numpy.core.multiarray._reconstruct": _numpy_arrays,
    "numpy._core.multiarray._reconstruct": _numpy_arrays,
    "numpy.ndarray": _numpy_arrays,
    "numpy.dtype": _numpy_arrays,
    **dict.fromkeys(DEEPSPEED_OBJECTS, _deepspeed_objects),
}


def load_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` that never runs code from the file: weights, plain data and :data:`SAFE_GLOBALS` only.

    Every model, checkpoint and state file is read here (DeepSpeed's own reads
    too: the engine points DeepSpeed's checkpoint engine at it). A file that names anything else is refused with
    one error naming it and what it names; a damaged one is one error naming it.
    """
    try:
        try:  # what the pickle names, read without unpickling it
            named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except ValueError:  # torch's legacy format (or no torch file): learnt from the unpickler's refusals below
            named = set()
        while True:
            refused = sorted(named - SAFE_GLOBALS.keys())
            if refused:
                raise CheckpointFileError(f"{path}: refused: the file calls for {', '.join(refused)}, which is "
                                          f"neither weights nor plain data (loading it could run code from it)")
            try:
                with torch.serialization.safe_globals([obj for group in {SAFE_GLOBALS[n] for n in named}
                                                       for obj in group()]):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:  # a name the scan could not see (legacy format): allow or refuse it
                found = re.search(r"GLOBAL (\S+)", str(e))
                if not found:
                    raise
                name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"  # torch drops it
                if name in named:
                    raise
                named.add(name)
    except CheckpointFileError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointFileError(f"{path}: cannot read this checkpoint file ({type(e).__name__}: "
                                  f"{_first_words(e)})") from None


def _first_words(e: Exception) -> str:
    """The line of an error message that says what went wrong (torch's unpickler wraps it in advice)."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
