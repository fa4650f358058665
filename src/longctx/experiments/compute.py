"""The ``compute:`` section of a comparison: every variant pretrained at several budgets, so the report can
put downstream quality against pretraining compute (the study's "disjoint blocks match Longformer with
half of its pretraining compute" is then read off one plot).

```yaml
compute: {flops: [1.0e+12, 2.0e+12, 4.0e+12]}     # or {seconds: [60, 120]} or {tokens: [...]}
```
Each (variant, budget) is a run of its own, ``<variant>-<budget>/`` (e.g. ``blocks-2e12/``), pretrained
with ``train.budget`` set to that budget: its steps are decided from its own cost per step and it
finishes its own LR schedule (a short run is not a long run cut early). Each is then finetuned on the
``finetune:`` section's tasks, as any variant. A rerun skips finished runs.

The report adds a table (variant x budget: steps, tokens, FLOPs, held-out loss, downstream scores with
95% intervals) and, per finetuned task, ``<task>_vs_compute.png``: the primary metric (95% interval as
error bars) against the pretraining FLOPs each run actually spent, one line per variant (held-out loss
when there is no finetune section).
"""
from __future__ import annotations

import copy
from pathlib import Path

from longctx.errors import LongctxError
from longctx.plots import line_figure
from longctx.train.finetune import task_class

UNITS = ("flops", "seconds", "tokens")


def check_spec(spec, base: dict, finetune: dict | None) -> dict:
    """{unit, budgets (ascending)} from ``{flops|seconds|tokens: [b1, b2, ...]}``, or a one-sentence error."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in UNITS:
        raise LongctxError("the compute section names one unit with a list of budgets: {flops: [1e12, 2e12]}, "
                           "{seconds: [...]} or {tokens: [...]}")
    unit, budgets = next(iter(spec.items()))
    try:
        values = [float(b) for b in (budgets if isinstance(budgets, list) else [None])]
    except (TypeError, ValueError):
        values = []
    if not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise LongctxError(f"compute.{unit} must be a list of distinct positive budgets, got {budgets!r}")
    if base["train"].get("budget"):
        raise LongctxError("the compute section sets each run's budget: remove train.budget from base")
    scratch = [t for t in finetune or {} if task_class(t).from_scratch]
    if scratch:
        raise LongctxError(f"finetune task(s) {', '.join(scratch)} train from scratch, which no pretraining budget "
                           "changes; run them in a comparison without a compute section")
    return {"unit": unit, "budgets": sorted(int(v) if unit == "tokens" else v for v in values)}


def label(unit: str, value: float) -> str:
    """A budget as a folder-name tail: flops 2e12 -> '2e12', seconds 60 -> '60s', tokens 1e5 -> '100000tok'."""
    if unit == "flops":
        return short(value)
    return f"{value:g}s" if unit == "seconds" else f"{int(value)}tok"


def short(value: float) -> str:
    """2e12 -> '2e12', 2.5e12 -> '2.5e12', 300 -> '300' (no '+', no leading zeros in the exponent)."""
    text = f"{value:.3g}"
    if "e" not in text:
        return text
    mantissa, exp = text.split("e")
    return f"{mantissa}e{int(exp)}"


def expand(variants: list[dict], spec: dict) -> list[dict]:
    """One run per (variant, budget), in variant order: the variant's entry with its budget set."""
    runs = []
    for v in variants:
        for b in spec["budgets"]:
            name = f"{v['name']}-{label(spec['unit'], b)}"
            cfg = copy.deepcopy(v["config"])
            cfg["train"]["budget"] = {spec["unit"]: b}
            cfg["name"] = name
            runs.append({**v, "name": name, "config": cfg, "compute": {"variant": v["name"], "budget": b}})
    return runs


def _finetuned(results: list[dict]) -> list[str]:
    return list(dict.fromkeys(t for r in results for t, ft in (r.get("finetune") or {}).items()
                              if not ft["from_scratch"]))


def _cell(value, ci) -> str:
    return f"{value:.3f}" if not ci else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table(results: list[dict], spec: dict) -> str:
    """Variant x budget: steps, tokens, pretraining FLOPs, held-out loss, downstream primary metrics."""
    tasks = _finetuned(results)
    head = ["variant", f"budget ({spec['unit']})", "steps", "tokens", "pretraining FLOPs", "held-out loss"]
    head += [f"{t} {_metric(results, t)}" for t in tasks]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ev = r["eval"]
        cells = [r["compute"]["variant"], short(r["compute"]["budget"]), f"{r['steps']:,}", f"{r['tokens']:,}",
                 f"{r['train_flops']:.3g}" if r.get("train_flops") is not None else "n/a",
                 _cell(ev["loss"], ev.get("loss_ci"))]
        for t in tasks:
            ft = (r.get("finetune") or {}).get(t)
            cells.append("n/a" if ft is None else _cell(ft["test"][ft["metric"]], ft["test"].get(f"{ft['metric']}_ci")))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report_lines(results: list[dict], spec: dict, out: Path) -> list[str]:
    """The compute section of report.md: the variant x budget table and the score-vs-compute plots."""
    lines = ["## Downstream score against pretraining compute", "",
             f"Every variant pretrained at each {spec['unit']} budget (its own run and LR schedule; steps = the "
             "budget divided by the variant's cost per step), then finetuned alike. Pretraining FLOPs: 6 x "
             "matrix-product weights per position + 3 x the attention mechanism's forward FLOPs, global tokens "
             "included (longctx.train.budget). 95% bootstrap intervals in brackets.", "",
             table(results, spec), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots(results, out)]
    return lines + [""]


def _metric(results: list[dict], task: str) -> str:
    return next(r["finetune"][task]["metric"] for r in results if task in (r.get("finetune") or {}))


def series(results: list[dict], task: str | None) -> list[dict]:
    """One line per variant: (pretraining FLOPs, score, 95% interval) at each budget, ascending FLOPs;
    ``task`` None: the held-out loss."""
    by_variant: dict[str, list] = {}
    for r in results:
        if r.get("train_flops") is None:
            continue
        if task is None:
            y, ci = r["eval"]["loss"], r["eval"].get("loss_ci")
        else:
            ft = (r.get("finetune") or {}).get(task)
            if ft is None:
                continue
            y, ci = ft["test"][ft["metric"]], ft["test"].get(f"{ft['metric']}_ci")
        by_variant.setdefault(r["compute"]["variant"], []).append((r["train_flops"], y, ci or (y, y)))
    out = []
    for i, (variant, pts) in enumerate(by_variant.items()):
        pts.sort()
        out.append({"x": [p[0] for p in pts], "y": [p[1] for p in pts], "label": variant, "style": "o-",
                    "color": f"C{i}", "yerr": ([p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts])})
    return out


def plots(results: list[dict], out: Path) -> list[Path]:
    """``<task>_vs_compute.png`` per finetuned task, or ``loss_vs_compute.png`` without finetuning."""

    paths = []
    for task in _finetuned(results) or [None]:
        ylabel = f"{task} {_metric(results, task)} (test, 95% interval)" if task else "held-out loss (95% interval)"
        paths.append(line_figure(out / f"{task or 'loss'}_vs_compute.png", series(results, task),
                                 "pretraining FLOPs (ticks at the runs' FLOPs)", ylabel, log_x=2,
                                 xticks_at_data=True))
    return paths
