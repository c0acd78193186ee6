"""`moe-asr <subcommand>`: one module per subcommand under ``moe_asr.tools``.

Each tool module exposes ``add_arguments(parser)`` and ``run(args) -> int``;
its docstring's first line is the help text. Modules are imported only when
their subcommand runs, so ``moe-asr --help`` stays fast and a tool's heavy
imports (deepspeed, sentencepiece) cost nothing to the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "model-info": "moe_asr.tools.model_info",
    "make-shards": "moe_asr.tools.make_shards",
    "train-tokenizer": "moe_asr.tools.train_tokenizer",
    "compute-cmvn": "moe_asr.tools.compute_cmvn",
    "convert": "moe_asr.tools.convert",
    "recognize": "moe_asr.tools.recognize",
    "score": "moe_asr.tools.score",
    "bench-rtf": "moe_asr.tools.bench_rtf",
    "export": "moe_asr.tools.export",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="moe-asr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, module_name in COMMANDS.items():
        if name == wanted:
            module = importlib.import_module(module_name)
            p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                               description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
        else:
            sub.add_parser(name, add_help=False)
    args = parser.parse_args(argv)
    if wanted is None:
        parser.print_help()
        return 0 if not argv else 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
