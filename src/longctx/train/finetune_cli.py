"""`longctx finetune`: train a model on a downstream task (from a saved model, or from scratch)."""
from __future__ import annotations

from pathlib import Path

from longctx.io import load_yaml

# Imports of torch, transformers and of modules that import them stay inside the functions that use them:
# the CLI parser imports this module (`longctx --help` stays fast: tests/test_newcomer.py).


def run(args) -> int:
    from longctx.train.finetune import finetune_config, run_finetune, summary_line

    cfg = finetune_config(args.task, load_yaml(args.config) if args.config else {}, args.overrides, args.init_from)
    out = Path(args.out or Path("runs") / f"finetune-{args.task}")
    result = run_finetune(cfg, args.task, out, resume=args.resume, progress=not args.quiet)
    print(f"{args.task}: {summary_line(result)} (95% intervals); model in {out / 'model'}, results in "
          f"{out / 'results.json'}")
    return 0


def register(sub) -> None:
    from longctx.train.finetune import TASK_NAMES

    p = sub.add_parser("finetune", help="finetune on a downstream task (QA, classification, LRA-style)",
                       description="Finetune a saved model (--init-from) or train from scratch on a task: "
                                   "extractive QA, long-document classification, or the LRA-style ListOps, "
                                   "byte-level text classification and document matching. Without task.*_file "
                                   "options the task's built-in data is used. Writes checkpoints, the model and "
                                   "results.json (dev and test metrics with 95% intervals).")
    p.add_argument("--task", required=True, choices=TASK_NAMES)
    p.add_argument("--init-from", metavar="MODEL_DIR", help="a saved longctx (or converted) model folder")
    p.add_argument("--config", help="YAML config file (sections model, data, train, task)")
    p.add_argument("--out", help="output folder (default runs/finetune-<task>)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config values, e.g. train.steps=200 task.train_file=train.jsonl")
    p.set_defaults(func=run)
