"""`longctx pretrain` (`longctx eval` is in longctx.eval.cli)."""
from __future__ import annotations

from pathlib import Path

# Imports of torch, transformers and of modules that import them stay inside the functions that use them:
# the CLI parser imports this module (`longctx --help` stays fast: tests/test_newcomer.py).



def _config(args) -> dict:
    from longctx.train.config import load_yaml, resolve
    return resolve(load_yaml(args.config) if args.config else {}, args.overrides)


def run_pretrain(args) -> int:
    from longctx.train.loop import pretrain
    cfg = _config(args)
    out = Path(args.out or Path("runs") / cfg["name"])
    result = pretrain(cfg, out, resume=args.resume, progress=not args.quiet)
    ev = result["eval"]
    # a loss over no tokens is not a result: say so rather than print 0.0000
    ci = f" [{ev['loss_ci'][0]:.3f}, {ev['loss_ci'][1]:.3f}]" if ev.get("loss_ci") else ""
    quality = (f"held-out loss {ev['loss']:.4f}{ci} (perplexity {ev['perplexity']:.2f})" if ev.get("loss") is not None
               else "no held-out tokens were evaluated")
    print(f"{quality} after {result['steps']} steps, "
          f"{result['tokens_per_s']:,.0f} tokens/s; model in {out / 'model'}, results in {out / 'results.json'}")
    return 0


def _common(p):
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config values, e.g. train.steps=200 model.window=128 data.corpus=docs/")


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (masked or causal LM)",
                       description="Pretrain a longctx model on a corpus; writes checkpoints, logs and the final model.")
    _common(p)
    p.add_argument("--out", help="output folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_pretrain)
