"""The import map of docs/architecture.md holds: no module imports a room it may not.

The table between the ``rooms`` markers in docs/architecture.md is the map: each
room, the import prefixes it owns, and the rooms it may import. Every import
statement of every module (function-level ones too) is checked against it, so
the doc and the code cannot drift apart. Third-party packages are not rooms,
except DeepSpeed, which only the rooms allowed to may import.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
# Source folders and the import name each one's files have.
SOURCES = {"moe_asr": "moe_asr", "kernels": "moe_asr_kernels", "bench": "bench", "launch": "launch"}


def _rooms() -> dict[str, tuple[list[str], set[str]]]:
    """room -> (owned import prefixes, rooms it may import), read from the doc's table."""
    text = DOC.read_text()
    table = re.search(r"<!-- rooms -->(.*?)<!-- /rooms -->", text, re.S)
    assert table, f"{DOC}: no table between <!-- rooms --> and <!-- /rooms -->"
    rooms = {}
    for line in table.group(1).strip().splitlines()[2:]:
        room, owns, may = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rooms[room] = (re.findall(r"`([\w.]+)`", owns), {r.strip() for r in may.split(",") if r.strip() not in ("", "-")})
    return rooms


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [SOURCES[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: Path) -> list[tuple[int, str]]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names]  # a name may be a module
    return found


def _room_of(name: str, rooms: dict) -> str | None:
    best, length = None, -1
    for room, (owns, _) in rooms.items():
        for prefix in owns:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > length:
                best, length = room, len(prefix)
    return best


def test_every_import_follows_the_map():
    rooms = _rooms()
    assert {"kernels", "moe", "model", "engine", "decode", "checkpoint", "tools", "bench", "deepspeed"} <= set(rooms)
    violations = []
    files = [p for folder in SOURCES for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 50
    for path in files:
        mine = _room_of(_module_name(path), rooms)
        assert mine is not None, f"{path.relative_to(REPO)} belongs to no room of {DOC.name}"
        for line, name in _imports(path):
            theirs = _room_of(name, rooms)
            if theirs is not None and theirs != mine and theirs not in rooms[mine][1]:
                violations.append(f"{path.relative_to(REPO)}:{line}: {mine} imports {name} ({theirs})")
    assert not violations, "imports against docs/architecture.md:\n" + "\n".join(sorted(set(violations)))


def test_the_map_keeps_the_layers():
    """The map itself says what the structure promises (so loosening it is a visible change)."""
    rooms = _rooms()
    below_model = {"schema", "symbols", "kernels", "moe"}
    for low in below_model:
        assert not rooms[low][1] & {"model", "engine", "decode", "checkpoint", "tools", "data"}, low
    for room in ("kernels", "moe", "model", "data", "decode"):
        assert "deepspeed" not in rooms[room][1], f"{room} may not import DeepSpeed"
    for room, (_, may) in rooms.items():
        assert not may & {"bench", "tests"} or room in ("bench", "tests"), room
    # A run is read through its format, never through the code that wrote it.
    assert not rooms["run"][1] & {"engine", "checkpoint", "train", "deepspeed"}
    for reader in ("checkpoint", "inference", "tools"):
        assert "engine" not in rooms[reader][1], f"{reader} reads runs through moe_asr.run, not the engine"
