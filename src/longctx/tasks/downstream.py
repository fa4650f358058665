"""The ``finetune:`` section of a comparison (``longctx compare``): after pretraining, every variant is
finetuned on the listed tasks with the same seed, data and budget; LRA-style tasks (``from_scratch``:
ListOps, byte-level text, retrieval) are trained from scratch with the variant's attention instead.

```yaml
finetune:
  qa: {train: {steps: 150}, data: {seq_len: 1024}, task: {context_chars: 4000}}   # from each variant's model
  listops: {train: {steps: 150}, task: {max_length: 200}, model: {max_position_embeddings: 512}}
```
Each entry is a finetuning config (sections ``model``, ``data``, ``train``, ``task``) applied to every
variant alike. A variant may set task options that are part of its attention, not of the budget:
``task.global_tokens`` (e.g. ``none`` for a sliding window without global tokens). ``seeds: 3`` finetunes
each variant three times (seeds seed, seed + 1, seed + 2): the score is then the mean with Student's t
interval over the seeds, which also holds the training noise that one run's bootstrap over its test
examples cannot see (measured on the default comparison's QA: test F1 spread about 0.05 between seeds).

The report gets a table of downstream scores (test split, 95% intervals) and a ranking
table: variants ranked by pretraining loss, by downstream score (pretrained tasks) and by LRA score
(from-scratch tasks), with Kendall's tau between the rankings: the study's question whether LRA
predicts finetuned quality, as a number.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

from longctx.errors import LongctxError
from longctx.tasks import metrics

VARIANT_TASK_KEYS = ("global_tokens",)  # what a variant may set for its finetuning


def check_spec(spec) -> dict:
    from longctx.tasks.finetune import TASK_NAMES

    if not isinstance(spec, dict) or not spec:
        raise LongctxError("the finetune section maps task names (qa, classification, listops, text, retrieval) to "
                           "their finetuning configs")
    for name, cfg in spec.items():
        if name not in TASK_NAMES:
            raise LongctxError(f"finetune: task {name!r} is unknown; use one of {', '.join(TASK_NAMES)}")
        if cfg is not None and not isinstance(cfg, dict):
            raise LongctxError(f"finetune.{name} must be a mapping of config sections (model, data, train, task)")
        unknown = set(cfg or {}) - {"model", "data", "train", "task", "seeds"}
        if unknown:
            raise LongctxError(f"finetune.{name} has unknown keys {sorted(unknown)}; use model, data, train, task "
                               "(and seeds)")
        seeds = (cfg or {}).get("seeds", 1)
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise LongctxError(f"finetune.{name}.seeds must be a whole number of finetuning runs (1 or more), "
                               f"not {seeds!r}")
    return {name: copy.deepcopy(cfg or {}) for name, cfg in spec.items()}


def split_variant_sets(name: str, sets: dict) -> tuple[dict, dict]:
    """(pretraining sets, finetuning task options) of a variant's ``set``."""
    pre, task = {}, {}
    for key, value in sets.items():
        if key.startswith("task."):
            if key[5:] not in VARIANT_TASK_KEYS:
                raise LongctxError(f"variant {name!r} sets '{key}': a variant may set only "
                                   f"{', '.join('task.' + k for k in VARIANT_TASK_KEYS)} (the rest of the "
                                   "finetuning is the same for every variant)")
            task[key[5:]] = value
        else:
            pre[key] = value
    return pre, task


def variant_config(task_name: str, spec: dict, variant_cfg: dict, task_sets: dict, model_dir: Path) -> dict:
    from longctx.tasks.finetune import deep_merge, finetune_config, task_class

    scratch = task_class(task_name).from_scratch
    raw = deep_merge({"seed": variant_cfg["seed"], "name": f"{variant_cfg['name']}-{task_name}"}, spec)
    raw["task"] = {**raw.get("task", {}), **task_sets}
    if scratch:  # LRA-style: the variant's attention, trained from scratch
        raw["model"] = deep_merge(variant_cfg["model"], spec.get("model") or {})
        return finetune_config(task_name, raw)
    if spec.get("model"):
        raise LongctxError(f"finetune.{task_name} starts from each variant's pretrained model: it takes no model "
                           "section")
    return finetune_config(task_name, raw, init_from=str(model_dir))


def finetune_variant(variant: dict, vdir: Path, spec: dict, task_sets: dict, progress: bool = True) -> dict:
    """Finetune one pretrained variant on every task of ``spec``; {task: summary}."""
    from longctx.experiments.variant import run_isolated
    from longctx.tasks.finetune import task_class

    out = {}
    for task_name, tspec in spec.items():
        tspec = dict(tspec)
        seeds = tspec.pop("seeds", 1)
        runs = []
        for k in range(seeds):  # seeds seed, seed + 1, ...: run k's folder gets a suffix after the first
            cfg = variant_config(task_name, tspec, variant["config"], task_sets, vdir / "model")
            cfg["seed"] += k
            if progress:
                print(f"  {variant['name']}: finetuning on {task_name}"
                      + (" (from scratch)" if task_class(task_name).from_scratch else "")
                      + (f", seed {cfg['seed']}" if seeds > 1 else ""), file=sys.stderr)
            # its own process, like pretraining: the score may not depend on what ran before it in this one
            runs.append(run_isolated(cfg, vdir / (f"finetune-{task_name}" + (f"-seed{k}" if k else "")), progress,
                                     task=task_name))
        r = runs[0]
        out[task_name] = {"metric": r["primary_metric"], "from_scratch": r["from_scratch"],
                          "test": _over_seeds([x["test"] for x in runs], r["primary_metric"]),
                          "dev": _over_seeds([x["eval"] for x in runs], r["primary_metric"]), "seeds": seeds,
                          "steps": r["steps"], "train_time_s": sum(x["train_time_s"] for x in runs),
                          "global_tokens": cfg["task"]["global_tokens"]}
    return out


def _over_seeds(evals: list[dict], metric: str) -> dict:
    """One run's metrics as they are (interval: bootstrap over its examples); several runs' primary metric
    as their mean with Student's t interval over the runs (the seed-to-seed spread), each run's value kept."""
    if len(evals) == 1:
        return evals[0]
    values = [e[metric] for e in evals]
    return {"split": evals[0]["split"], metric: sum(values) / len(values), f"{metric}_ci": metrics.t_interval(values),
            f"{metric}_per_seed": values, "examples": evals[0].get("examples")}


def ranking(results: list[dict]) -> dict:
    """Ranks (1 = best) by pretraining loss, by downstream score (mean primary test metric of the
    pretrained tasks) and by LRA score (of the from-scratch tasks), and Kendall's tau between them."""
    def score(r, scratch):
        vals = [t["test"][t["metric"]] for t in r.get("finetune", {}).values() if t["from_scratch"] == scratch]
        return sum(vals) / len(vals) if vals else None

    columns = {"pretraining loss": ([r["eval"]["loss"] for r in results], False),
               "downstream": ([score(r, False) for r in results], True),
               "LRA": ([score(r, True) for r in results], True)}
    columns = {k: v for k, v in columns.items() if all(x is not None for x in v[0])}
    ranks = {k: metrics.ranks(vals, hib) for k, (vals, hib) in columns.items()}
    names = list(ranks)
    tau = {f"{a} vs {b}": metrics.kendall_tau(ranks[a], ranks[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    return {"variants": [r["variant"] for r in results], "scores": {k: v[0] for k, v in columns.items()},
            "ranks": ranks, "kendall_tau": tau}


def report_lines(results: list[dict], rank: dict) -> list[str]:
    tasks = list(dict.fromkeys(t for r in results for t in r.get("finetune", {})))
    if not tasks:
        return []
    first = next(r for r in results if r.get("finetune"))["finetune"]
    head = ["variant"] + [f"{t} {first[t]['metric']}" + (" (from scratch)" if first[t]["from_scratch"] else "")
                          for t in tasks]
    lines = ["## Downstream (finetuned)", "",
             "Test-split score after finetuning every variant with the same seed, data and steps (pretrained "
             "tasks start from the variant's model; LRA-style tasks train the variant's attention from scratch); "
             "95% interval in brackets: a bootstrap over test examples for one finetuning seed, or, where the task "
             "ran several (n seeds), the mean over seeds with Student's t interval over them; global tokens used "
             "in finetuning after the score.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["variant"]]
        for t in tasks:
            ft = r.get("finetune", {}).get(t)
            if ft is None:
                cells.append("n/a")
                continue
            m = ft["metric"]
            lo, hi = ft["test"][f"{m}_ci"]
            seeds = f", {ft['seeds']} seeds" if ft.get("seeds", 1) > 1 else ""
            cells.append(f"{ft['test'][m]:.3f} [{lo:.3f}, {hi:.3f}] ({ft['global_tokens']}{seeds})")
        lines.append("| " + " | ".join(cells) + " |")
    if rank["ranks"]:
        names = list(rank["ranks"])
        lines += ["", "Rankings (1 = best):", "", "| variant | " + " | ".join(names) + " |",
                  "|" + "---|" * (len(names) + 1)]
        for i, v in enumerate(rank["variants"]):
            lines.append(f"| {v} | " + " | ".join(str(rank["ranks"][n][i]) for n in names) + " |")
        if rank["kendall_tau"]:
            lines += ["", "Kendall's tau between rankings: " + "; ".join(
                f"{k}: {v:+.2f}" if v == v else f"{k}: undefined (one ranking is all ties)"
                for k, v in rank["kendall_tau"].items()) + " (+1 same order, -1 reversed)."]
    return lines + [""]
