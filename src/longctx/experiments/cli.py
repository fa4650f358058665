"""`longctx compare`: the main job."""
from __future__ import annotations

from pathlib import Path

from longctx.errors import LongctxError

from longctx.io import write_text

# Imports of torch, transformers and of modules that import them stay inside the functions that use them:
# the CLI parser imports this module (`longctx --help` stays fast: tests/test_newcomer.py).


def run_compare(args) -> int:
    from longctx.experiments.compare import load_comparison, run_comparison
    from longctx.experiments.report import table

    comp = load_comparison(args.config, args.overrides)
    if args.name:
        comp["name"] = args.name
    if args.jobs is not None:
        if args.jobs < 1:
            raise LongctxError(f"--jobs must be 1 or more, not {args.jobs}")
        comp["jobs"] = args.jobs
    summary = run_comparison(comp, args.out, progress=not args.quiet, rerun_changed=args.rerun_changed,
                             jobs=comp["jobs"])
    out = Path(args.out) / comp["name"]
    study = summary.get("study")
    print(table(summary["variants"], study))
    from longctx.experiments.report import downstream_lines, shows_lines
    rest = downstream_lines(summary["variants"], study) + shows_lines(study)
    if rest:
        print("\n" + "\n".join(rest))
    from longctx.experiments.report import extrapolation_table
    ext = extrapolation_table(summary["variants"])
    if ext:  # LeX: perplexity at each evaluation length (same tokens), positions x lengths
        print("\nperplexity by evaluation length (95% interval over documents):\n" + ext)
    if comp.get("compute"):  # every variant at each pretraining budget
        from longctx.experiments.compute import table as compute_table
        print("\nscore against pretraining compute (95% intervals):\n" + compute_table(summary["variants"], comp["compute"]))
    print(f"\nreport: {out / 'report.md'}  (results.json, loss_vs_steps.png, loss_vs_time.png, speed_memory.png)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="pretrain attention variants under identical conditions and report",
                       description="Pretrain every variant of a comparison on the same data, seed and budget "
                                   "(tokens, or train.budget in FLOPs or seconds), then write runs/<name>/report.md, results.json and plots. With no "
                                   "--config it runs the built-in CPU-sized comparison.")
    p.add_argument("--config", help="comparison YAML (name, base, variants); default: the built-in one")
    p.add_argument("--out", default="runs", help="parent folder of the run (default runs/)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--jobs", type=int, help="runs at once, each with cores // jobs threads (default: the config's "
                                            "jobs, 1 if unset)")
    p.add_argument("--rerun-changed", action="store_true",
                   help="train again (deleting the old run) every finished or started run whose config differs from "
                        "the one asked for now; without it such a run is refused")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config values: base keys for every variant (train.steps=40) or the comparison's "
                        "own (finetune.qa.train.steps=20, seeds=1, reference=full)")
    p.set_defaults(func=run_compare)
    register_claims(sub)


def run_claims(args) -> int:
    from longctx.experiments.claims import evaluate_all, markdown

    if args.action == "conversion":
        from longctx.experiments.conversion import run_conversion
        run_conversion(args.out, args.overrides, progress=not args.quiet, rerun_changed=args.rerun_changed)
    elif args.overrides:
        raise LongctxError("`longctx claims table` takes no overrides (they belong to `longctx claims conversion`)")
    md = markdown(evaluate_all(args.out))
    print(md)
    if args.write:
        write_text(Path(args.write), md)
        print(f"written: {args.write}")
    return 0


def register_claims(sub) -> None:
    p = sub.add_parser("claims", help="the papers' claims: measured figures, intervals and verdicts",
                       description="`longctx claims table` reads the runs under --out (each claim's command, printed "
                                   "in the table, makes its run) and prints, or with --write writes, the table of the "
                                   "papers' claims with the measured figure, its 95%% interval and the verdict. "
                                   "`longctx claims conversion` runs Longformer's conversion recipe (a short masked LM "
                                   "made long by copied or random positions) and then prints the table.")
    p.add_argument("action", choices=["table", "conversion"], help="table: the verdicts; conversion: run that recipe")
    p.add_argument("--out", default="runs", help="the folder the claims' runs are in (default runs/)")
    p.add_argument("--write", metavar="FILE", help="also write the table as markdown (e.g. docs/claims.md)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--rerun-changed", action="store_true", help="conversion: retrain a short model whose config changed")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="conversion: overrides of its pretraining "
                                                                      "(train.steps=100)")
    p.set_defaults(func=run_claims)
