"""Train, convert, decode, score and export U2++ MoE speech recognizers.

Each subcommand is one module under ``moe_asr.tools`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; its docstring's first line is
the help text. Modules are imported only when their subcommand runs (the help
list reads the docstrings from source), so ``moe-asr --help`` stays fast and a
tool's heavy imports (deepspeed, sentencepiece) cost nothing to the others.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from pathlib import Path

COMMANDS: dict[str, str] = {
    "model-info": "moe_asr.tools.model_info",
    "plan": "moe_asr.tools.plan",
    "make-shards": "moe_asr.tools.make_shards",
    "train-tokenizer": "moe_asr.tools.train_tokenizer",
    "compute-cmvn": "moe_asr.tools.compute_cmvn",
    "convert": "moe_asr.tools.convert",
    "recognize": "moe_asr.tools.recognize",
    "score": "moe_asr.tools.score",
    "bench-rtf": "moe_asr.tools.bench_rtf",
    "export": "moe_asr.tools.export",
}


def summary(module_name: str) -> str:
    """The first line of a tool module's docstring, read from its source without importing it."""
    spec = importlib.util.find_spec(module_name)
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) if spec and spec.origin else None
    return doc.strip().splitlines()[0] if doc else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="moe-asr", description=__doc__.splitlines()[0],
                                     epilog="`moe-asr COMMAND --help` shows a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, module_name in COMMANDS.items():
        if name == wanted:
            module = importlib.import_module(module_name)
            p = sub.add_parser(name, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
        else:  # the summaries are read (from source) only for the list that a run without a command prints
            sub.add_parser(name, help=None if wanted else summary(module_name), add_help=False)
    args = parser.parse_args(argv)
    if wanted is None:
        parser.print_help()
        return 0 if not argv else 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
