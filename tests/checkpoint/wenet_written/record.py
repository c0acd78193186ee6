"""Describe a checkpoint that WeNet's own training wrote, as JSON: every tensor's shape and dtype, and
rows of its sinusoid position tables.

    python record.py RECIPE/exp/u2pp_moe/epoch_0.pt > u2pp_moe/final.pt.json

The tests build their WeNet checkpoints from random weights and check them
against this description, so that they are laid out as WeNet's are without
the repository holding WeNet's code or its megabytes of position tables.
"""
from __future__ import annotations

import json
import sys

import torch

PE_ROWS = (0, 1, 2, 100, 4999)


def describe(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {
        "tensors": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()},
        "pe_rows": {k: {str(r): v[0, r].tolist() for r in PE_ROWS} for k, v in state.items() if k.endswith(".pe")},
    }


def dumps(description: dict) -> str:
    """JSON with one line per tensor, so a diff of two recordings reads key by key."""
    sections = [f"{json.dumps(name)}: {{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in part.items())
                + "\n }" for name, part in description.items()]
    return "{\n " + ",\n ".join(sections) + "\n}\n"


if __name__ == "__main__":
    sys.stdout.write(dumps(describe(sys.argv[1])))
