"""The `longctx` command: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes ``register(subparsers)``; the module adds its
parser and sets ``func`` to the function that runs it. User errors (``LongctxError``) end the program
with one clear sentence and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from longctx.errors import LongctxError

EXPLAIN_ENV = "LONGCTX_EXPLAIN_ATTENTION"  # read by longctx.attention.dispatch (not imported here: no torch)

# subcommand modules, in the order `longctx --help` lists them
COMMAND_MODULES = [
    "longctx.experiments.cli",
    "longctx.train.cli",
    "longctx.eval.cli",
    "longctx.eval.analyze_cli",
    "longctx.train.finetune_cli",
    "longctx.corpora.cli",
    "longctx.bench.cli",
    "longctx.convert.cli",
    "longctx.export_cli",
    "longctx.config_cli",
    "longctx.attention_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longctx", description=__doc__.splitlines()[0])
    parser.add_argument("--explain-attention", action="store_true",
                        help=f"log which attention kernel runs, and why the others do not, at the first call of "
                             f"each distinct shape (as {EXPLAIN_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def resume_hint(args) -> str:
    """How an interrupted command continues: a training command with --resume; compare by running it
    again (it skips finished runs and resumes the interrupted one)."""
    if args.command == "compare":
        return "; rerunning the same command resumes it"
    if hasattr(args, "resume"):
        return "; rerun it with --resume to continue from its last checkpoint"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `eval MODEL --config F KEY=VALUE`: argparse hands out a command's positionals once, so overrides
    # after an option come back unclaimed; they are overrides all the same, in the order given
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.explain_attention:  # the environment, so that the processes a command starts explain too
        os.environ[EXPLAIN_ENV] = "1"
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LongctxError as e:
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longctx {args.command}: interrupted{resume_hint(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
