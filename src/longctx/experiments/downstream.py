"""The ``finetune:`` section of a comparison (``longctx compare``): after pretraining, every pretrained model
(each variant, each pretraining seed) is finetuned on the listed tasks; LRA-style tasks (``from_scratch``:
ListOps, byte-level text, retrieval) are trained from scratch with the variant's attention instead, once per
seed.

```yaml
finetune:
  qa: {lr: [3.0e-4, 1.0e-3], train: {steps: 300, eval_every: 50, keep_best: true}, task: {context_chars: 500}}
  listops: {train: {steps: 150}, task: {max_length: 200}, model: {max_position_embeddings: 512}}
  ruler:                     # RULER tasks with shared settings: ruler_niah_single and ruler_vt
    tasks: {niah_single: {}, vt: {task: {num_hops: 2}}}
    data: {seq_len: 128}
    task: {length: [400, 800]}
```
Each entry is a finetuning config (sections ``model``, ``data``, ``train``, ``task``) applied to every
variant alike, plus:
- ``lr: [a, b, ...]``: the learning-rate grid of the paper's protocol (Xiong et al. 2022 finetune each model
  with its own best hyperparameters): every grid point is run for every seed, and each VARIANT gets the
  point with the best mean dev score over its seeds (ties: the first in the grid). Only dev scores choose;
  test is read for the chosen point only. With ``train.keep_best`` each run's model is its best dev
  evaluation (every ``train.eval_every`` steps and the last).
- ``grid_seeds: G``: the grid runs on the first G pretraining seeds only, and the chosen point on the others
  (default: every seed runs the whole grid). The choice is still each variant's, on dev; the remaining seeds
  then cost one run each instead of one per grid point.
- ``seeds: K``: K finetuning runs of each pretrained model (seeds s, s + 1, ... for pretraining seed s).

A variant may set task options that are part of its attention, not of the budget: ``task.global_tokens``
(e.g. ``none`` for a sliding window without global tokens).

Every run of a task is scored on the same dev and test examples (``data.seed`` is the comparison's), so its
per-example scores line up across seeds and variants: the summary keeps them (``test.per_example``, one row
per seed) for the paired statistics of ``longctx.experiments.study``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from longctx.errors import LongctxError
from longctx.experiments.runs import Run
from longctx.stats import rows_interval
from longctx.train.config import _check_tree
from longctx.train.finetune import RULER_NAMES, TASK_NAMES, task_class, deep_merge, finetune_config

# Imports of modules that import torch stay inside the functions that use them: a comparison's driver
# process imports no torch (its runs do, in their zygote: experiments/variant.py).

# what a variant may set for its finetuning: which tokens are global (heading_global: the tasks that have it,
# StructFormer's section_heading; the others ignore it)
VARIANT_TASK_KEYS = ("global_tokens", "heading_global")
SPEC_KEYS = ("model", "data", "train", "task", "seeds", "lr", "grid_seeds")
RULER_GROUP = "ruler"  # finetune.ruler: several RULER tasks with shared settings (expand_ruler)


def expand_ruler(spec):
    """The ``ruler:`` group of a finetune section as one entry per RULER task: ``tasks`` (a list of names
    without ``ruler_``, or a mapping name -> that task's own entry) and the settings every listed task shares
    (any key of an entry: data, train, task, lr, seeds, grid_seeds). ``ruler_<name>``'s entry is the shared
    settings with the task's own merged over them, then a ``ruler_<name>`` entry written beside the group (or
    set by an override, ``finetune.ruler_vt.train.steps=20``) merged over that, in the group's place. The
    merge is ``deep_merge``, the one ``finetune_config`` builds a run's config with (``train.config.merge``
    checks experiment keys, which an entry's ``task``, ``lr`` and ``seeds`` are not), so the expansion is
    exactly the entries written out: the same configs, the same run fingerprints, the same runs reused."""
    if not isinstance(spec, dict) or RULER_GROUP not in spec:
        return spec
    group, names = spec[RULER_GROUP], [n[len("ruler_"):] for n in RULER_NAMES]
    tasks = group.get("tasks") if isinstance(group, dict) else None
    if isinstance(tasks, list) and all(isinstance(t, str) for t in tasks) and len(set(tasks)) == len(tasks):
        tasks = {t: None for t in tasks}
    if not isinstance(tasks, dict) or not tasks:
        raise LongctxError("finetune.ruler needs 'tasks': a list of distinct RULER task names or a mapping of each "
                           f"to its own settings ({', '.join(names)})")
    shared = {k: v for k, v in group.items() if k != "tasks"}
    unknown = sorted(set(shared) - set(SPEC_KEYS))
    if unknown:
        raise LongctxError(f"finetune.ruler has unknown keys {unknown}; use tasks and model, data, train, task "
                           "(and seeds, lr, grid_seeds)")
    expanded = {}
    for name, own in tasks.items():
        if name not in names:
            raise LongctxError(f"finetune.ruler.tasks: {name!r} is not a RULER task; use {', '.join(names)}")
        if own is not None and not isinstance(own, dict):
            raise LongctxError(f"finetune.ruler.tasks.{name} must be a mapping of its own settings (data, train, task, ...)")
        full = f"ruler_{name}"
        entry = deep_merge(shared, own or {})
        if isinstance(spec.get(full), dict):
            entry = deep_merge(entry, spec[full])
        expanded[full] = entry
    out = {}
    for key, value in spec.items():
        if key == RULER_GROUP:
            out.update(expanded)
        elif key not in expanded:
            out[key] = value
    return out


def check_spec(spec) -> dict:
    spec = expand_ruler(spec)
    if not isinstance(spec, dict) or not spec:
        raise LongctxError("the finetune section maps task names (qa, classification, listops, text, retrieval) to "
                           "their finetuning configs")
    for name, cfg in spec.items():
        if name not in TASK_NAMES:
            raise LongctxError(f"finetune: task {name!r} is unknown; use one of {', '.join(TASK_NAMES)}")
        if cfg is not None and not isinstance(cfg, dict):
            raise LongctxError(f"finetune.{name} must be a mapping of config sections (model, data, train, task)")
        cfg = cfg or {}
        unknown = set(cfg) - set(SPEC_KEYS)
        if unknown:
            raise LongctxError(f"finetune.{name} has unknown keys {sorted(unknown)}; use model, data, train, task "
                               "(and seeds, lr, grid_seeds)")
        seeds = cfg.get("seeds", 1)
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise LongctxError(f"finetune.{name}.seeds must be a whole number of finetuning runs (1 or more), "
                               f"not {seeds!r}")
        g = cfg.get("grid_seeds", 1)
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise LongctxError(f"finetune.{name}.grid_seeds must be a number of pretraining seeds (1 or more), not {g!r}")
        grid = cfg.get("lr")
        if grid is not None and (not isinstance(grid, list) or not grid or len(set(grid)) != len(grid) or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in grid)):
            raise LongctxError(f"finetune.{name}.lr must be a list of distinct positive learning rates (the grid "
                               f"chosen from on dev), not {grid!r}")
        try:  # the sections' keys and types now, not after an hour of pretraining
            _check_tree({k: v for k, v in cfg.items() if k in ("model", "data", "train")})
            cls = task_class(name)
            seq_len = (cfg.get("data") or {}).get("seq_len") or (getattr(cls, "CONFIG", {}).get("data") or {}).get("seq_len")
            if hasattr(cls, "check_chunking") and seq_len:  # QA-style tasks: the chunks must advance
                cls.check_chunking({**cls.OPTIONS, **(cfg.get("task") or {})}, seq_len)
        except LongctxError as e:
            raise LongctxError(f"finetune.{name}: {e}") from None
    return {name: copy.deepcopy(cfg or {}) for name, cfg in spec.items()}


def check_objective(spec: dict, objective: str) -> None:
    """A task finetuned from the pretrained models that fixes its model's objective (a RULER task's generation
    form: clm) needs models pretrained with it: refused before any pretraining, not after."""
    for name, cfg in spec.items():
        cls = task_class(name)
        need = cls.objective_for((cfg or {}).get("task") or {})
        if need and need != objective and not cls.from_scratch:
            raise LongctxError(f"finetune.{name} finetunes models of objective={need} (its task options; a RULER "
                               f"task's task.form=generation), but the variants are pretrained with objective={objective}; "
                               f"set objective: {need} in base, or use task.form=extractive")


def split_variant_sets(name: str, sets: dict) -> tuple[dict, dict]:
    """(pretraining sets, finetuning task options) of a variant's ``set``."""
    pre, task = {}, {}
    for key, value in sets.items():
        if key.startswith("task."):
            if key[5:] not in VARIANT_TASK_KEYS:
                raise LongctxError(f"variant {name!r} sets '{key}': a variant may set only "
                                   f"{' and '.join('task.' + k for k in VARIANT_TASK_KEYS)} (which tokens are global; "
                                   "the rest of the finetuning is the same for every variant)")
            task[key[5:]] = value
        else:
            pre[key] = value
    return pre, task


def task_sets_for(task_name: str, task_sets: dict) -> dict:
    """The variant's finetuning settings that ``task_name`` has (global_tokens for every task)."""
    return {k: v for k, v in task_sets.items() if k == "global_tokens" or k in task_class(task_name).OPTIONS}


def check_variant_task_options(name: str, task_sets: dict, spec: dict) -> None:
    """Each finetune task's options with the variant's settings, checked before any run starts."""
    from longctx.tasks.common import task_options
    for task_name, tspec in spec.items():
        try:
            task_options(task_class(task_name), {**((tspec or {}).get("task") or {}), **task_sets_for(task_name, task_sets)})
        except LongctxError as e:
            raise LongctxError(f"variant {name!r}, finetune.{task_name}: {e}") from None


def variant_config(task_name: str, spec: dict, variant_cfg: dict, task_sets: dict, model_dir: Path) -> dict:
    """The finetuning config of one task for one pretrained run (``variant_cfg``: its pretraining config,
    whose seed and data seed the finetuning takes); ``spec`` without ``seeds`` and ``lr``."""

    scratch = task_class(task_name).from_scratch
    raw = deep_merge({"seed": variant_cfg["seed"], "name": f"{variant_cfg['name']}-{task_name}"}, spec)
    data_seed = (variant_cfg.get("data") or {}).get("seed")
    if data_seed is not None:  # the comparison's examples, whatever the training seed
        raw["data"] = {**raw.get("data", {}), "seed": data_seed}
    raw["task"] = {**raw.get("task", {}), **task_sets_for(task_name, task_sets)}
    if scratch:  # LRA-style: the variant's attention, trained from scratch
        raw["model"] = deep_merge(variant_cfg["model"], spec.get("model") or {})
        return finetune_config(task_name, raw)
    if spec.get("model"):
        raise LongctxError(f"finetune.{task_name} starts from each variant's pretrained model: it takes no model "
                           "section")
    return finetune_config(task_name, raw, init_from=str(model_dir))


def _lr_tag(lr: float) -> str:
    return f"{lr:g}".replace("+", "")


def plan(variant: dict, pretrained: list, spec: dict, task_sets: dict, chosen: dict | None = None) -> list:
    """The finetuning runs of one variant (``longctx.experiments.runs.Run``, with ``meta``); ``pretrained``:
    its pretraining runs, one per seed, finished.

    Without ``chosen``: every task's runs, except that a task with a grid (``lr: [...]``) runs its grid on its
    first ``grid_seeds`` pretraining seeds only (default: all). With ``chosen`` ({task: lr}, read off those
    runs' dev scores by ``choose_lr``): the chosen point on the remaining seeds of each task with a grid."""

    runs = []
    for task_name, tspec in spec.items():
        tspec = dict(tspec)
        ft_seeds, grid = tspec.pop("seeds", 1), tspec.pop("lr", None)
        g = tspec.pop("grid_seeds", None) or len(pretrained)
        scratch = task_class(task_name).from_scratch
        if chosen is None:
            points = [(lr, i) for lr in grid for i in range(min(g, len(pretrained)))] if grid else \
                [(None, i) for i in range(len(pretrained))]
        else:
            points = [(chosen[task_name], i) for i in range(g, len(pretrained))] if grid else []
        for lr, index in points:
            pre = pretrained[index]
            for k in range(ft_seeds):
                cfg = variant_config(task_name, tspec, pre.cfg, task_sets, pre.dir / "model")
                cfg["seed"] += k
                if lr is not None:
                    cfg["train"]["lr"] = float(lr)
                folder = (f"finetune-{task_name}" + (f"-lr{_lr_tag(lr)}" if grid and len(grid) > 1 else "")
                          + (f"-seed{k}" if k else ""))
                what = (f"{variant['name']} (seed {pre.cfg['seed']}): {task_name}"
                        + (" from scratch" if scratch else "") + (f", lr {lr:g}" if lr is not None else "")
                        + (f", finetuning seed {cfg['seed']}" if ft_seeds > 1 else ""))
                # its own process, like pretraining: the score may not depend on what ran before it
                run = Run(cfg, pre.dir / folder, what, task=task_name,
                          after=None if scratch else pre.identity)
                run.meta = {"task": task_name, "lr": cfg["train"]["lr"], "pretraining_seed": pre.cfg["seed"],
                            "index": index, "seed": cfg["seed"], "grid": grid, "grid_run": chosen is None,
                            "global_tokens": cfg["task"]["global_tokens"]}
                runs.append(run)
    return runs


def choices(runs: list) -> dict:
    """{task: the learning rate chosen on dev} for each task with a grid, from ``plan``'s first runs."""
    out = {}
    for task in dict.fromkeys(r.meta["task"] for r in runs if r.meta["grid"]):
        mine = [{"lr": r.meta["lr"], "result": r.result} for r in runs if r.meta["task"] == task]
        out[task] = choose_lr(mine, mine[0]["result"]["primary_metric"])[0]
    return out


def summaries(runs: list) -> dict:
    """{task: summary} of one variant's finished finetuning runs (``plan``'s)."""
    out = {}
    for task in dict.fromkeys(r.meta["task"] for r in runs):
        mine = sorted((r for r in runs if r.meta["task"] == task), key=lambda r: (r.meta["index"], r.meta["seed"]))
        out[task] = summarize([{**r.meta, "dir": str(r.dir), "result": r.result} for r in mine], mine[0].meta["grid"],
                              mine[0].meta["global_tokens"])
    return out


def choose_lr(runs: list[dict], metric: str, higher_is_better: bool = True) -> tuple[float, dict]:
    """(the grid point with the best mean DEV score over its runs, {lr: mean dev score}); ties go to the
    first point in the grid. Test scores are never read here."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r["result"]["eval"][metric])
    means = {lr: float(np.mean(v)) for lr, v in by_lr.items()}
    best = None
    for lr, m in means.items():  # grid order
        if best is None or (m > means[best] if higher_is_better else m < means[best]):
            best = lr
    return best, means


def summarize(runs: list[dict], grid, global_tokens) -> dict:
    """The task's summary for one variant: the chosen learning rate and, for its runs, the test score (mean
    over seeds), the per-seed scores and the per-example scores (one row per seed)."""
    first = runs[0]["result"]
    metric = first["primary_metric"]
    # the choice is read off the grid's runs only (those on the first grid_seeds seeds), as it was made
    lr, dev_by_lr = choose_lr([r for r in runs if r.get("grid_run", True)], metric)
    chosen = [r for r in runs if r["lr"] == lr]
    tests = [r["result"]["test"] for r in chosen]
    per_example = [t.get("per_example") for t in tests]
    test = {"split": "test", metric: float(np.mean([t[metric] for t in tests])), "examples": tests[0].get("examples"),
            f"{metric}_per_seed": [t[metric] for t in tests]}
    ci = rows_interval(per_example)
    if ci is not None:
        test["per_example"] = per_example
        test[f"{metric}_ci"] = ci
    else:  # runs of an older longctx, or one test example: the one run's own interval, if any
        test[f"{metric}_ci"] = tests[0].get(f"{metric}_ci")
    return {"metric": metric, "from_scratch": first["from_scratch"], "global_tokens": global_tokens,
            "lr": lr, "lr_grid": list(grid) if grid else [lr], "dev_by_lr": {f"{k:g}": v for k, v in dev_by_lr.items()},
            "dev": {metric: dev_by_lr[lr]}, "test": test, "seeds": len(chosen),
            "runs": [{"lr": r["lr"], "pretraining_seed": r["pretraining_seed"], "seed": r["seed"], "dir": r["dir"],
                      "dev": r["result"]["eval"][metric], "best_step": r["result"].get("best_step"),
                      **({"test": r["result"]["test"][metric]} if r["lr"] == lr else {})} for r in runs],
            "steps": first["steps"], "train_time_s": sum(r["result"]["train_time_s"] for r in runs)}
