"""`longctx compare`: pretrain several attention variants under identical conditions and report.

A comparison is a base experiment config plus a list of variants, each a name and a few dotted keys
that differ (``{name: sliding, set: {model.attention: sliding, model.window: 128}}``). Every variant
trains on the same data in the same order with the same seed and the same budget: a variant may
not change ``seed``, ``data.corpus``, ``data.tokenizer``, ``data.seq_len``, ``train.steps``,
``train.budget``, ``train.batch_size`` or ``train.grad_accum``; it may set ``stages`` (staged training
against one phase) when its last phase ends at ``data.seq_len``, where every variant is evaluated; the
equal compute is then the recipe's to arrange (each run records its ``train_flops``). The budget is the same
tokens (``train.steps``), or, with ``train.budget: {flops: F}`` / ``{seconds: S}`` in base, the same
training FLOPs (each counted for the variant's own model and attention) or wall-clock time: each
variant then takes the steps its budget buys (longctx.train.budget). A ``compute:`` section pretrains
every variant at several budgets (longctx.experiments.compute).

``seeds: K`` (or a list of seeds) pretrains every variant once per seed (seeds base.seed, base.seed + 1,
...), and finetunes every pretrained model: the seeds vary what training draws (initial weights, data
order, masks, dropout), never the data itself (``data.seed`` stays the base seed), so every run is scored
on the same held-out sequences and test examples. ``reference:`` names the variant every other one is
compared to (paired differences, longctx.experiments.study; default: the first variant). ``jobs: N`` runs
up to N runs at once, each with cores // N threads (longctx.experiments.variant.run_children).

Each run is its own process, so its peak memory is its own, and writes ``runs/<name>/<variant>/`` (the
first seed; ``<variant>-seed<s>/`` for the others): checkpoints, metrics, TensorBoard logs, final model,
results.json. A rerun skips finished runs whose config is unchanged, resumes an interrupted one, and refuses
one whose config changed (``--rerun-changed`` trains it again; longctx.experiments.runs). The report
(report.md, results.json and PNG plots) is written at the end.

Overrides reach every section: ``train.steps=20`` (and any key of base) sets base; ``finetune.qa.train.steps=20``,
``seeds=1``, ``reference=full``, ``compute.flops=[1e12]`` set the comparison's own keys (mappings are merged).
"""
from __future__ import annotations

import copy
import json
import math
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from longctx.data.corpus import corpus_identity
from longctx.errors import LongctxError
from longctx.experiments import compute, downstream
from longctx.experiments.report import write_report
from longctx.experiments.runs import Run, run_all
from longctx.stats import rows_interval
from longctx.train.config import dotted, load_yaml, merge, parse_overrides, resolve
from longctx.train.finetune import deep_merge

# Imports of modules that import torch stay inside the functions that use them: a comparison's driver
# process imports no torch (its runs do, in their zygote: experiments/variant.py).

FIXED = ("seed", "data.corpus", "data.tokenizer", "data.seq_len", "data.text_field", "data.valid_fraction",
         "data.seed", "train.steps", "train.budget", "train.batch_size", "train.grad_accum")


def _check_variant_stages(name: str, cfg: dict) -> None:
    """A variant may train in phases of its own (staged against one-phase training at the same compute:
    the recipe's step counts make the FLOPs equal, and each run records the FLOPs it spent,
    ``train_flops``), but it ends at the comparison's length, ``data.seq_len``: the held-out evaluation,
    at the last phase's length, is then on the same sequences for every variant."""
    from longctx.tasks.base import stage_list
    stages = stage_list(cfg)
    if stages and stages[-1]["seq_len"] != cfg["data"]["seq_len"]:
        raise LongctxError(f"variant {name!r}: its last phase trains at seq_len={stages[-1]['seq_len']}, not at "
                           f"data.seq_len={cfg['data']['seq_len']}; a variant's stages end at the comparison's "
                           "length, where every variant is evaluated on the same held-out sequences")
SECTIONS = ("name", "base", "variants", "seeds", "reference", "jobs", "extrapolation", "finetune", "analysis", "compute")
OWN_KEYS = ("name", "seeds", "reference", "jobs", "extrapolation", "finetune", "analysis", "compute")  # overrides not for base


def default_config_path() -> Path:
    return Path(str(resources.files("longctx") / "configs" / "compare-default.yaml"))


def _seeds(value, base_seed: int) -> list[int]:
    """``seeds: K`` -> [s, s + 1, ..., s + K - 1] from base.seed; a list of distinct seeds as it is."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return [base_seed + k for k in range(value)]
    if (isinstance(value, list) and value and len(set(value)) == len(value)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)):
        return list(value)
    raise LongctxError(f"seeds must be a number of pretraining seeds (1 or more) or a list of distinct seeds, "
                       f"not {value!r}")


def _override_variants(variants: list, given) -> list:
    """``variants.NAME.KEY=VALUE`` overrides: KEY set in that variant's ``set`` (after the file's)."""
    names = [str(v.get("name")) for v in variants if isinstance(v, dict)]
    if not isinstance(given, dict) or not all(isinstance(sets, dict) for sets in given.values()):
        raise LongctxError("a variant override is variants.NAME.KEY=VALUE (variants.staged.train.lr=0.001)")
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise LongctxError(f"override for variant(s) {', '.join(unknown)}, not in this comparison "
                           f"({', '.join(names)})")
    out = []
    for v in variants:
        v = copy.deepcopy(v)
        if isinstance(v, dict) and str(v.get("name")) in given:
            v["set"] = {**(v.get("set") or {}), **dotted(given[str(v["name"])])}
        out.append(v)
    return out


def load_comparison(path: str | Path | None, overrides: list[str] | None) -> dict:
    """{name, base (resolved config), seeds, reference, variants: [{name, config}], ...}."""
    raw = load_yaml(path or default_config_path())
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise LongctxError(f"comparison config has unknown keys {sorted(unknown)}; use name, base, variants "
                           "(and seeds, reference, jobs, extrapolation, finetune, analysis, compute)")
    given = parse_overrides(overrides or [])
    if "base" in given:
        raise LongctxError("overrides set base keys directly (train.steps=20, not base.train.steps=20)")
    per_variant = given.pop("variants", None)
    own = {k: given.pop(k) for k in list(given) if k in OWN_KEYS}
    raw = deep_merge(raw, own)
    variants = raw.get("variants") or []
    if not isinstance(variants, list) or not variants:
        raise LongctxError("comparison config needs a non-empty list 'variants'")
    if per_variant is not None:
        variants = _override_variants(variants, per_variant)
    base_raw = merge(raw.get("base") or {}, given)
    base = resolve(base_raw)
    if base["data"].get("seed") is None:  # the data of every seed's runs is the base seed's
        base_raw = merge(base_raw, {"data": {"seed": base["seed"]}})
        base = resolve(base_raw)
    out, names = [], set()
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or "name" not in v:
            raise LongctxError(f"variants[{i}] needs a 'name'")
        name = str(v["name"])
        if name in names or not name.replace("-", "").replace("_", "").replace("+", "").isalnum():
            raise LongctxError(f"variant name {name!r} is repeated or not a plain word (letters, digits, - _ +)")
        names.add(name)
        sets = v.get("set") or {}
        if not isinstance(sets, dict):
            raise LongctxError(f"variant {name!r}: 'set' must map dotted keys to values")
        all_sets, (sets, task_sets) = sets, downstream.split_variant_sets(name, sets)  # task.*: finetuning only
        for key in sets:
            if any(key == f or key.startswith(f + ".") for f in FIXED):
                raise LongctxError(f"variant {name!r} changes '{key}': a comparison keeps data, seed and "
                                   "budget identical; change it in 'base' for all variants (or use a compute "
                                   "section for several budgets)")
        cfg = resolve(copy.deepcopy(base_raw), [f"{k}={json.dumps(val)}" for k, val in sets.items()])
        cfg["name"] = name
        if any(k == "stages" or k.startswith("stages.") for k in sets):
            _check_variant_stages(name, cfg)
        out.append({"name": name, "set": all_sets, "config": cfg, "task_sets": task_sets})
    reference = raw.get("reference", out[0]["name"])
    if reference not in names:
        raise LongctxError(f"reference {reference!r} is not one of the variants ({', '.join(n['name'] for n in out)})")
    jobs = raw.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise LongctxError(f"jobs must be the number of runs at once (1 or more), not {jobs!r}")
    comp = {"name": str(raw.get("name") or "compare"), "base": base, "variants": out, "jobs": jobs,
            "seeds": _seeds(raw.get("seeds", 1), base["seed"]), "reference": reference}
    if raw.get("finetune") is not None:  # finetune every variant on downstream tasks (the study)
        comp["finetune"] = downstream.check_spec(raw["finetune"])
        downstream.check_objective(comp["finetune"], base["objective"])
        for v in out:  # what a variant sets for its finetuning, checked against every task's options now
            downstream.check_variant_task_options(v["name"], v["task_sets"], comp["finetune"])
    if raw.get("compute") is not None:  # every variant at several pretraining budgets
        comp["compute"] = compute.check_spec(raw["compute"], base, comp.get("finetune"))
        comp["variants"] = compute.expand(out, comp["compute"])
        comp["reference"] = next(v["name"] for v in comp["variants"] if v["compute"]["variant"] == reference)
    if raw.get("analysis") is not None:  # where each variant's attention goes (StructFormer)
        from longctx.eval.analysis import check_spec as check_analysis
        comp["analysis"] = check_analysis(raw["analysis"])
    if raw.get("extrapolation") is not None:  # evaluate every variant at longer lengths (LeX)
        from longctx.eval.extrapolation import check_spec
        comp["extrapolation"] = check_spec(raw["extrapolation"])
        if base["objective"] != "clm":
            raise LongctxError("the extrapolation section needs causal LMs: set objective: clm in base")
    return comp


def attention_flops_per_token(cfg: dict) -> float:
    """Forward attention-core FLOPs per token, all heads, all layers, as each layer's mechanism counts
    its useful work at the run's length (``Mechanism.flops``; for a mask, 4 * head size per allowed pair)."""
    from longctx.models.config import from_run_config
    mc = from_run_config(cfg, vocab_size=8)
    n = cfg["data"]["seq_len"]
    return sum(m.flops(n) for m in mc.layer_mechanisms()) / n


def over_seeds(runs: list[dict]) -> dict:
    """A variant's pretraining results over its seeds: the first seed's record, with the held-out loss the
    mean over seeds (per-sequence scores kept, one row per seed, and their interval over seeds and sequences),
    speed and time the mean, memory the peak."""

    r = copy.deepcopy(runs[0])
    evs = [x["eval"] for x in runs]
    per = [e.get("per_example") for e in evs]
    ev = dict(evs[0])
    ev["loss"] = float(np.mean([e["loss"] for e in evs]))
    ev["perplexity"] = math.exp(min(ev["loss"], 50.0))
    ev["loss_per_seed"] = [e["loss"] for e in evs]
    if "bits_per_char" in ev:
        ev["bits_per_char"] = float(np.mean([e["bits_per_char"] for e in evs]))
    ev.pop("per_example", None)
    ci = rows_interval(per)
    if ci is not None:  # None: one held-out sequence (or runs of an older longctx): no interval to give
        ev["per_example"] = per
        ev["loss_ci"] = ci
    r["eval"] = ev
    r["tokens_per_s"] = float(np.mean([x["tokens_per_s"] for x in runs]))
    r["train_time_s"] = float(np.mean([x["train_time_s"] for x in runs]))
    r["peak_memory_bytes"] = max(x["peak_memory_bytes"] for x in runs)
    return r


def run_comparison(comp: dict, out_root: str | Path, progress: bool = True, rerun_changed: bool = False,
                   jobs: int = 1) -> dict:
    """Pretrain every variant at every seed, then finetune every pretrained model (up to ``jobs`` runs at
    once), then evaluate and analyse, then write the report."""

    out = Path(out_root) / comp["name"]
    out.mkdir(parents=True, exist_ok=True)
    d = comp["base"]["data"]
    comp["corpus"] = corpus_identity(d["corpus"], d["text_field"])  # a run made on other text is a stale run
    n = len(comp["variants"])
    pre = {}  # variant -> its pretraining runs, one per seed (the first seed in <variant>/)
    for i, v in enumerate(comp["variants"]):
        pre[v["name"]] = []
        for s in comp["seeds"]:
            cfg = copy.deepcopy(v["config"])
            cfg["seed"] = s
            folder = v["name"] if s == comp["seeds"][0] else f"{v['name']}-seed{s}"
            what = f"[{i + 1}/{n}] {v['name']}" + (f" seed {s}" if len(comp["seeds"]) > 1 else "") + " pretraining"
            pre[v["name"]].append(Run(cfg, out / folder, what, after=comp["corpus"]["sha256"]))
    if progress:
        print(f"pretraining {n} variant(s) x {len(comp['seeds'])} seed(s)" + (f", {jobs} at once" if jobs > 1 else ""),
              file=sys.stderr)
    run_all([r for runs in pre.values() for r in runs], jobs, progress, rerun_changed)
    ft = {}
    if comp.get("finetune"):
        ft = {v["name"]: downstream.plan(v, pre[v["name"]], comp["finetune"], v.get("task_sets", {}))
              for v in comp["variants"]}
        if progress:
            print(f"finetuning: {sum(map(len, ft.values()))} run(s)", file=sys.stderr)
        run_all([r for runs in ft.values() for r in runs], jobs, progress, rerun_changed)
        rest = {v["name"]: downstream.plan(v, pre[v["name"]], comp["finetune"], v.get("task_sets", {}),
                                           chosen=downstream.choices(ft[v["name"]])) for v in comp["variants"]}
        if any(rest.values()):  # grids run on their first seeds: the chosen points on the others
            if progress:
                print(f"finetuning at the learning rates chosen on dev: {sum(map(len, rest.values()))} run(s)",
                      file=sys.stderr)
            run_all([r for runs in rest.values() for r in runs], jobs, progress, rerun_changed)
            ft = {name: ft[name] + rest[name] for name in ft}
    results = []
    for i, v in enumerate(comp["variants"]):
        r = over_seeds([p.result for p in pre[v["name"]]])
        r["variant"] = v["name"]
        r["set"] = v["set"]
        r["seeds"] = list(comp["seeds"])
        if v.get("compute"):
            r["compute"] = v["compute"]
        r["attention_flops_per_token"] = attention_flops_per_token(v["config"])
        vdir = pre[v["name"]][0].dir  # extrapolation and attention analysis: of the first seed's model
        if comp.get("extrapolation"):
            from longctx.eval.extrapolation import evaluate_variant
            if progress:
                print(f"[{i + 1}/{n}] {v['name']}: extrapolation", file=sys.stderr)
            r["extrapolation"] = evaluate_variant(v["config"], vdir, comp["extrapolation"], progress)
        if ft:
            r["finetune"] = downstream.summaries(ft[v["name"]])
        if comp.get("analysis"):
            from longctx.eval.analysis import analyze_variant
            r["analysis"] = analyze_variant(v["name"], vdir, comp["analysis"], progress)
        results.append(r)
    return write_report(comp, results, out)


def _describe(v: dict) -> str:
    return ", ".join(f"{k}={val}" for k, val in v["set"].items()) or "base config"
