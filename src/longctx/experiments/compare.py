"""`longctx compare`: pretrain several attention variants under identical conditions and report.

A comparison is a base experiment config plus a list of variants, each a name and a few dotted keys
that differ (``{name: sliding, set: {model.attention: sliding, model.window: 128}}``). Every variant
trains on the same data in the same order with the same seed and the same budget: a variant may
not change ``seed``, ``data.corpus``, ``data.tokenizer``, ``data.seq_len``, ``train.steps``,
``train.budget``, ``train.batch_size``, ``train.grad_accum`` or ``stages``. The budget is the same
tokens (``train.steps``), or, with ``train.budget: {flops: F}`` / ``{seconds: S}`` in base, the same
training FLOPs (each counted for the variant's own model and attention) or wall-clock time: each
variant then takes the steps its budget buys (longctx.train.budget). A ``compute:`` section pretrains
every variant at several budgets (longctx.experiments.compute).

Each variant runs in its own process, so its peak memory is its own, and writes
``runs/<name>/<variant>/`` (checkpoints, metrics, TensorBoard logs, final model, results.json). A rerun
skips finished variants and resumes an interrupted one. The report (report.md, results.json and PNG
plots) is written at the end.
"""
from __future__ import annotations

import copy
import json
import sys
from importlib import resources
from pathlib import Path

from longctx.errors import LongctxError
from longctx.experiments.variant import run_isolated
from longctx.train.config import load_yaml, merge, parse_overrides, resolve

FIXED = ("seed", "data.corpus", "data.tokenizer", "data.seq_len", "data.text_field", "data.valid_fraction",
         "train.steps", "train.budget", "train.batch_size", "train.grad_accum", "stages")


def default_config_path() -> Path:
    return Path(str(resources.files("longctx") / "configs" / "compare-default.yaml"))


def load_comparison(path: str | Path | None, overrides: list[str] | None) -> dict:
    """{name, base (resolved config), variants: [{name, config}]}; overrides apply to the base."""
    raw = load_yaml(path or default_config_path())
    unknown = set(raw) - {"name", "base", "variants", "extrapolation", "finetune", "analysis", "compute"}
    if unknown:
        raise LongctxError(f"comparison config has unknown keys {sorted(unknown)}; use name, base, variants "
                           "(and extrapolation, finetune, analysis, compute)")
    variants = raw.get("variants") or []
    if not isinstance(variants, list) or not variants:
        raise LongctxError("comparison config needs a non-empty list 'variants'")
    base_raw = merge(raw.get("base") or {}, parse_overrides(overrides or []))
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
        from longctx.tasks.downstream import split_variant_sets
        all_sets, (sets, task_sets) = sets, split_variant_sets(name, sets)  # task.*: finetuning only
        for key in sets:
            if any(key == f or key.startswith(f + ".") for f in FIXED):
                raise LongctxError(f"variant {name!r} changes '{key}': a comparison keeps data, seed and "
                                   "budget identical; change it in 'base' for all variants (or use a compute "
                                   "section for several budgets)")
        cfg = resolve(copy.deepcopy(base_raw), [f"{k}={json.dumps(val)}" for k, val in sets.items()])
        cfg["name"] = name
        out.append({"name": name, "set": all_sets, "config": cfg, "task_sets": task_sets})
    comp = {"name": str(raw.get("name") or "compare"), "base": base, "variants": out}
    if raw.get("finetune") is not None:  # finetune every variant on downstream tasks (the study)
        from longctx.tasks.downstream import check_spec
        comp["finetune"] = check_spec(raw["finetune"])
    if raw.get("compute") is not None:  # every variant at several pretraining budgets
        from longctx.experiments import compute
        comp["compute"] = compute.check_spec(raw["compute"], base, comp.get("finetune"))
        comp["variants"] = compute.expand(out, comp["compute"])
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
    from longctx.models import LongctxConfig
    fields = dict(cfg["model"], vocab_size=8)
    if cfg["objective"] == "clm":
        fields["causal"] = True
    mc = LongctxConfig(**fields)
    n = cfg["data"]["seq_len"]
    return sum(m.flops(n) for m in mc.layer_mechanisms()) / n


def run_comparison(comp: dict, out_root: str | Path, progress: bool = True) -> dict:
    out = Path(out_root) / comp["name"]
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, v in enumerate(comp["variants"]):
        vdir = out / v["name"]
        done = vdir / "results.json"
        if done.exists():
            if progress:
                print(f"[{i + 1}/{len(comp['variants'])}] {v['name']}: finished earlier, skipped", file=sys.stderr)
        else:
            if progress:
                print(f"[{i + 1}/{len(comp['variants'])}] {v['name']}: training ({_describe(v)})", file=sys.stderr)
            run_isolated(v["config"], vdir, progress)
        r = json.loads(done.read_text())
        r["variant"] = v["name"]
        r["set"] = v["set"]
        if v.get("compute"):
            r["compute"] = v["compute"]
        r["attention_flops_per_token"] = attention_flops_per_token(v["config"])
        if comp.get("extrapolation"):
            from longctx.eval.extrapolation import evaluate_variant
            if progress:
                print(f"[{i + 1}/{len(comp['variants'])}] {v['name']}: extrapolation", file=sys.stderr)
            r["extrapolation"] = evaluate_variant(v["config"], vdir, comp["extrapolation"], progress)
        if comp.get("finetune"):
            from longctx.tasks.downstream import finetune_variant
            r["finetune"] = finetune_variant(v, vdir, comp["finetune"], v.get("task_sets", {}), progress)
        if comp.get("analysis"):
            from longctx.eval.analysis import analyze_variant
            r["analysis"] = analyze_variant(v["name"], vdir, comp["analysis"], progress)
        results.append(r)
    from longctx.experiments.report import write_report
    return write_report(comp, results, out)


def _describe(v: dict) -> str:
    return ", ".join(f"{k}={val}" for k, val in v["set"].items()) or "base config"
