"""The `longctx` command: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes ``register(subparsers)``; the module adds its
parser and sets ``func`` to the function that runs it. User errors (``LongctxError``) end the program
with one clear sentence and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from longctx.errors import LongctxError

# subcommand modules, in the order `longctx --help` lists them
COMMAND_MODULES = [
    "longctx.experiments.cli",
    "longctx.train.cli",
    "longctx.data.corpus_cli",
    "longctx.bench.cli",
    "longctx.convert.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longctx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LongctxError as e:
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longctx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
