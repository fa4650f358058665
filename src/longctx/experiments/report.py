"""The comparison report: results.json (machine-readable), report.md (the table people read) and plots."""
from __future__ import annotations

import datetime
import json
import sys
from importlib import metadata
from pathlib import Path

from longctx.experiments import compute
from longctx.experiments.compute import short
from longctx.experiments.study import analyse
from longctx.io import read_jsonl, write_text
from longctx.memory import machine_facts
from longctx.plots import line_figure, bar_figure, ema

# Imports of modules that import torch stay inside the functions that use them: a comparison's driver
# process imports no torch (its runs do, in their zygote: experiments/variant.py).


def _with_ci(value: float, ci) -> str:
    """``5.5904 [5.55, 5.63]``: a figure and its 95% interval, when there is one."""
    return f"{value:.4f}" if not ci else f"{value:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table(results: list[dict], study: dict | None = None) -> str:
    """The pretraining table; with the study's statistics, a column of paired differences to the reference."""
    base = results[0]
    vs = ((study or {}).get("columns") or {}).get("pretraining loss")
    clm = any(r["objective"] == "clm" for r in results)
    # under a FLOPs or time budget the steps differ between variants: show what each one spent
    budgeted = any(r.get("budget") for r in results)
    head = ["variant", "attention", "params", "held-out loss", "bits/char" if clm else "perplexity",
            "tokens/s", "speed vs " + base["variant"], "peak memory", "train time", "attn MFLOP/token"]
    head += ["steps", "tokens", "train FLOPs"] if budgeted else []
    if vs:
        head.insert(4, f"vs {study['reference']} (paired)")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ev = r["eval"]
        quality = f"{ev['bits_per_char']:.3f}" if clm else f"{ev['perplexity']:.1f}"
        cells = [r["variant"], r["attention"], f"{r['parameters'] / 1e6:.2f}M", _with_ci(ev["loss"], ev.get("loss_ci")), quality,
                 f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
                 f"{r['peak_memory_bytes'] / 2**30:.2f} GiB", f"{r['train_time_s']:.0f} s",
                 f"{r['attention_flops_per_token'] / 1e6:,.3f}"] + (_spent(r) if budgeted else [])
        if vs:
            cells.insert(4, vs_cell(vs["vs_reference"], r["variant"], 4))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def vs_cell(vs_reference: dict, variant: str, digits: int = 3) -> str:
    """``-0.012 [-0.020, -0.004] better``: a variant's paired difference to the reference and its label."""
    row = vs_reference["rows"].get(variant)
    if row is None:
        return "reference"
    lo, hi = row["ci"]
    holm = f" (Holm p {row['p_holm']:.2g})" if row.get("p_holm") is not None else ""
    return f"{row['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] {row['label']}{holm}"


def downstream_lines(results: list[dict], study: dict | None) -> list[str]:
    """The downstream table (test score, interval, chosen learning rate, paired difference to the reference)
    and the rankings with ties and Kendall's tau with intervals."""
    tasks = list(dict.fromkeys(t for r in results for t in r.get("finetune", {})))
    if not tasks:
        return []
    first = next(r for r in results if r.get("finetune"))["finetune"]
    cols = (study or {}).get("columns") or {}
    colname = {t: f"{t} (LRA, from scratch)" if first[t]["from_scratch"] else t for t in tasks}
    head = ["variant"]
    for t in tasks:
        head.append(f"{colname[t]} {first[t]['metric']}")
        if colname[t] in cols:
            head.append(f"vs {study['reference']}")
    lines = ["## Downstream (finetuned)", "",
             "Test score after finetuning (pretrained tasks start from each of the variant's pretrained models; "
             "LRA-style tasks train the variant's attention from scratch, once per seed): the mean over seeds, with a "
             "95% interval over seeds and test examples; in parentheses the learning rate chosen for the variant on "
             "dev and the global tokens used. Paired differences to the reference: the same test examples and seeds, "
             "95% interval of the one comparison, and the label with Holm's adjusted p-value over the family (an "
             "interval that excludes 0 next to \"not separated\" did not survive the correction).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["variant"]]
        for t in tasks:
            ft = r.get("finetune", {}).get(t)
            if ft is None:
                cells += ["n/a"] + (["n/a"] if colname[t] in cols else [])
                continue
            m = ft["metric"]
            ci = ft["test"].get(f"{m}_ci") or [float("nan")] * 2
            seeds = f", {ft['seeds']} runs" if ft.get("seeds", 1) > 1 else ""
            cells.append(f"{ft['test'][m]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] (lr {ft['lr']:g}, {ft['global_tokens']}{seeds})")
            if colname[t] in cols:
                cells.append(vs_cell(cols[colname[t]]["vs_reference"], r["variant"]))
        lines.append("| " + " | ".join(cells) + " |")
    grids = {t: first[t]["lr_grid"] for t in tasks if len(first[t].get("lr_grid", [])) > 1}
    if grids:
        lines += ["", "Learning rates tried (each variant's choice: the best mean dev score over its seeds; test is "
                      "never read to choose): " + "; ".join(f"{t}: {', '.join(f'{x:g}' for x in g)}" for t, g in grids.items())
                  + "."]
    return lines + [""] + ranking_lines(study)


def ranking_lines(study: dict | None) -> list[str]:
    cols = (study or {}).get("columns") or {}
    if not cols:
        return []
    names = list(cols)
    variants = list(next(iter(cols.values()))["ranks"])
    lines = ["## Rankings", "", "Rank 1 = best; a variant's rank is 1 + the number of variants separated ahead of it "
             "(all pairs, paired differences, Holm), so variants that are not separated share a rank.", "",
             "| variant | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(str(cols[n]["ranks"][v]) for n in names) + " |")
    if study.get("kendall_tau"):
        lines += ["", "Kendall's tau between the rankings of the variants' mean scores (95% bootstrap interval over "
                      "seeds and examples; +1 same order, -1 reversed): " + "; ".join(
                          f"{k}: {t['tau']:+.2f} [{t['ci'][0]:+.2f}, {t['ci'][1]:+.2f}]" if t["tau"] == t["tau"]
                          else f"{k}: undefined (one ranking is all ties)" for k, t in study["kendall_tau"].items()) + "."]
    return lines + [""]


def shows_lines(study: dict | None) -> list[str]:
    if not study or not study.get("findings"):
        return []
    return ["## What this run shows", "", "Computed from the statistics above (nothing here is written by hand):", ""] + [
        f"- {f}" if not f.startswith("  ") else f"  {f.strip()}" for f in study["findings"]] + [""]


def _spent(r: dict) -> list[str]:
    flops = r.get("train_flops")
    return [f"{r['steps']:,}", f"{r['tokens']:,}", f"{flops:.3g}" if flops is not None else "n/a"]


def _extrapolation_lines(results: list[dict]):
    """(variant, setting, rows) for each extrapolation run of each variant, and the lengths evaluated."""
    lines = [(r["variant"], name, run) for r in results if r.get("extrapolation")
             for name, run in r["extrapolation"]["runs"].items()]
    lengths = sorted({row["length"] for _, _, run in lines for row in run["rows"]})
    return lines, lengths


def extrapolation_table(results: list[dict], metric: str = "perplexity") -> str | None:
    """Variants (x with / without blockwise causal attention) x evaluation lengths: perplexity with its
    95% interval over documents, or attention resolution; "n/a" where a length cannot be evaluated."""
    lines, lengths = _extrapolation_lines(results)
    if not lines:
        return None
    L = next(r for r in results if r.get("extrapolation"))["extrapolation"]["training_length"]
    head = ["variant", "attention at evaluation"] + [f"{n:,} ({n / L:g}L)" for n in lengths]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, name, run in lines:
        by_len = {row["length"]: row for row in run["rows"]}
        cells = []
        for n in lengths:
            row = by_len.get(n)
            if row is None or "skipped" in row or metric not in row:
                cells.append("n/a")
            elif metric == "perplexity" and row.get("perplexity_ci95"):
                lo, hi = row["perplexity_ci95"]
                cells.append(f"{row['perplexity']:.2f} ({lo:.2f}-{hi:.2f})")
            else:
                cells.append(f"{row[metric]:.4f}" if metric != "perplexity" else f"{row[metric]:.2f}")
        setting = f"blockwise causal, block {run['blockwise']}" if run["blockwise"] else "causal"
        rows.append("| " + " | ".join([variant, setting, *cells]) + " |")
    return "\n".join(rows)


def _extrapolation_plot(results: list[dict], out: Path) -> Path | None:
    lines, lengths = _extrapolation_lines(results)
    if not lines:
        return None
    series = []
    for variant, name, run in lines:
        pts = [(row["length"], row["perplexity"]) for row in run["rows"] if "perplexity" in row]
        series.append({"x": [x for x, _ in pts], "y": [y for _, y in pts], "style": "o--" if run["blockwise"] else "o-",
                       "label": variant + (" + blockwise" if run["blockwise"] else "")})
    return line_figure(out / "perplexity_vs_length.png", series, "evaluation length (tokens)",
                       "perplexity (same tokens at every length)", log_x=2, log_y=True, xticks=lengths)


def _budget(comp: dict) -> dict | None:
    """The comparison's budget when it is not tokens: base train.budget, or the compute section's."""
    if comp.get("compute"):
        return {comp["compute"]["unit"]: comp["compute"]["budgets"]}
    return comp["base"]["train"].get("budget")


def _budget_words(budget: dict) -> str:
    """{'flops': 3e12} -> 'budget of 3e12 training FLOPs'; a list (compute section) -> 'budgets of ...'."""
    unit, value = next(iter(budget.items()))
    what = {"flops": "training FLOPs", "seconds": "seconds of training steps", "tokens": "training tokens"}[unit]
    values = value if isinstance(value, list) else [value]
    return f"budget{'s' if len(values) > 1 else ''} of {', '.join(map(short, values))} {what}"


def _controlled_line(c: dict) -> str:
    same = (f"{c['steps']} steps of batch {c['batch_size']} ({c['tokens_per_variant']:,} tokens)" if not c["budget"]
            else f"batch {c['batch_size']}, the same {_budget_words(c['budget'])} (each variant takes the steps its "
                 "budget buys: steps, tokens and FLOPs per variant below)")
    return (f"Every variant: {c['objective'].upper()} on `{c['corpus']}`, sequence length {c['seq_len']}, {same}, "
            f"seed {c['seed']}, same data in the same order. Held-out loss on documents never trained on.")


def software_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    # longctx's distribution is longctx-toolkit ("longctx" on PyPI is another project)
    for pkg, dist in (("longctx", "longctx-toolkit"), ("torch", "torch"), ("transformers", "transformers"),
                      ("numpy", "numpy"), ("tokenizers", "tokenizers")):
        try:
            out[pkg] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def corpus_line(corpus: dict | None, software: dict) -> str:
    sw = ", ".join(f"{k} {v}" for k, v in software.items() if v)
    if not corpus:
        return f"Software: {sw}."
    return (f"Corpus: `{corpus['name']}` ({corpus.get('documents', '?')} documents, sha256 {corpus['sha256'][:16]}...); "
            f"every run reused here was made on this corpus. Software: {sw}.")


def write_report(comp: dict, results: list[dict], out: Path) -> dict:
    base = comp["base"]
    budget = _budget(comp)
    summary = {
        "name": comp["name"],
        "controlled": {"seed": base["seed"], "corpus": str(base["data"]["corpus"]), "seq_len": base["data"]["seq_len"],
                       "steps": None if budget else base["train"]["steps"], "batch_size": base["train"]["batch_size"],
                       "tokens_per_variant": None if budget else results[0]["tokens"], "budget": budget,
                       "objective": base["objective"]},
        "machine": machine_facts(),
        "date": datetime.date.today().isoformat(),
        "software": software_versions(),
        "corpus": comp.get("corpus"),
        "seeds": comp.get("seeds", [base["seed"]]),
        "variants": results,
    }
    summary["study"] = study = analyse(results, comp.get("reference", results[0]["variant"]))
    write_text(out / "results.json", json.dumps(summary, indent=1))
    plots = _plots(results, out)
    c = summary["controlled"]
    seeds = summary["seeds"]
    md = [f"# Comparison: {comp['name']}", "", _controlled_line(c)
          + (f" Pretraining seeds {', '.join(map(str, seeds))} (training draws only: every seed is scored on the same "
             "held-out sequences and test examples)." if len(seeds) > 1 else ""), "",
          corpus_line(summary["corpus"], summary["software"]), "",
          table(results, study), "",
          "Tokens/s: training tokens per second of training-step time (evaluation and checkpoints excluded), a single "
          "measurement per run (mean over seeds) on a machine that may have been busy: read speed ratios as rough"
          + (f"; {comp.get('jobs')} runs at once shared the machine, so these are not each variant's speed alone. "
             if comp.get("jobs", 1) > 1 else ". ") +
          "Peak memory: the variant process's peak resident memory (CPU) or peak allocated GPU memory. "
          "Held-out loss: the mean over seeds, 95% interval over seeds and held-out sequences in brackets; the paired "
          "column is the difference to the reference on the same sequences (negative: lower loss). "
          "Attention MFLOP/token: forward QK^T and PV over the pairs the pattern allows. "
          "Loss plots (the first seed's runs): the training loss (an EMA whose beta falls with the number of points logged) "
          "and the held-out loss at each evaluation with its 95% interval over held-out sequences."
          + (" Train FLOPs: steps x the FLOPs of a step (6 x matrix-product weights per position it runs on + 3 x the "
             "attention mechanism's forward FLOPs, global tokens included; the mean of the first steps' batches)."
             if budget else ""),
          ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    if extrapolation_table(results):
        ex = next(r for r in results if r.get("extrapolation"))["extrapolation"]
        md += ["", "## Length extrapolation (LeX's protocol)", "",
               f"Trained at L = {ex['training_length']}; evaluated on the same {ex['tokens']:,} tokens of each of "
               f"{ex['documents']} held-out {ex['units']} at every length (chunks of the length, each scored fully"
               + (f", sliding by {ex['stride']}" if ex.get("stride") else "") + "). Blockwise causal attention: "
               "blocks of L/2, for relative positions only; learned positions cannot go beyond their table (n/a).",
               "", "Perplexity (95% interval over documents):", "", extrapolation_table(results), ""]
        if extrapolation_table(results, "attention_resolution") and any(
                "attention_resolution" in row for _, _, run in _extrapolation_lines(results)[0] for row in run["rows"]):
            md += ["Attention resolution (mean over layers, on the attention used):", "",
                   extrapolation_table(results, "attention_resolution"), ""]
        md += ["![perplexity_vs_length](perplexity_vs_length.png)"]
    md += [""] + downstream_lines(results, study)
    heatmaps = ruler_heatmaps(results, out)
    if heatmaps:
        md += ["", "### RULER: accuracy by needle depth and context length", "",
               "One heatmap per RULER task and variant (test split, the chosen learning rate's runs; a cell is the mean "
               "over its examples and seeds of exact match (the extractive form) or RULER's string_match_all (the "
               "generation form), blank where no example fell):", ""]
        md += [f"- `{p.name}`: ![{p.stem}]({p.name})" for p in heatmaps] + [""]
    if not any(r.get("finetune") for r in results):
        md += ranking_lines(study)
    md += shows_lines(study)
    if comp.get("compute"):  # score against pretraining compute, one line per variant
        md += [""] + compute.report_lines(results, comp["compute"], out)
    if any(r.get("analysis") for r in results):  # StructFormer: where each variant's attention goes
        from longctx.eval.analysis import compare_lines
        md += [""] + compare_lines(results, out)
    m = summary["machine"]
    md += ["", f"Machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, {m['platform']}; run {summary.get('date', '?')}.", ""]
    write_text(out / "report.md", "\n".join(md))
    return summary


def ruler_heatmaps(results: list[dict], out: Path) -> list[Path]:
    """``ruler_<task>_<variant>.png`` for every ruler_* task of the finetune section: the cell metric
    (``tasks.ruler.cell_metric``) by needle depth and context length on the test split, pooled over the chosen
    learning rate's runs (seeds; same test examples); a run folder without per-example depths (an older
    longctx) is skipped."""
    import numpy as np

    from longctx.tasks.ruler import cell_metric, depth_length_table
    from longctx.plots import heatmap_figure

    paths = []
    for r in results:
        for task, ft in sorted((r.get("finetune") or {}).items()):
            if not task.startswith("ruler_"):
                continue
            tests, bins = [], 5
            for run in ft.get("runs", []):
                if "test" not in run:  # not the chosen learning rate
                    continue
                d = Path(run["dir"])
                try:
                    res = json.loads((d / "results.json").read_text())
                    cfg = json.loads((d / "run_config.json").read_text()) if (d / "run_config.json").exists() else {}
                except (OSError, json.JSONDecodeError):
                    continue
                t = res.get("test") or {}
                if "per_example_depth" in t:
                    tests.append(t)
                    bins = int(((cfg.get("task") or {}).get("depth_bins")) or bins)
            if not tests:
                continue
            metric = cell_metric(tests[0])
            score = np.mean([t[f"per_example_{metric}"] for t in tests], axis=0)
            m, rows, cols = depth_length_table(tests[0]["per_example_depth"], tests[0]["per_example_length"], score,
                                               bins)
            paths.append(heatmap_figure(out / f"{task}_{r['variant']}.png", m, rows, [str(c) for c in cols],
                                        "context length", "needle depth",
                                        title=f"{task}, {r['variant']}: {metric.replace('_', ' ')} ({len(tests)} run(s))"))
    return paths


def _plots(results: list[dict], out: Path) -> list[Path]:
    rows = {r["variant"]: read_jsonl(out / r["variant"] / "metrics.jsonl") for r in results}
    paths = []
    for key, label, name in [("step", "step", "loss_vs_steps.png"), ("train_time", "training time (s)", "loss_vs_time.png")]:
        paths.append(line_figure(out / name, _loss_series(rows, key), label, "loss"))
    names = [r["variant"] for r in results]
    paths.append(bar_figure(out / "speed_memory.png", names, [
        ([r["tokens_per_s"] for r in results], "training tokens/s", "tab:blue"),
        ([r["peak_memory_bytes"] / 2**30 for r in results], "peak memory (GiB)", "tab:orange")], figsize=(9, 3.5)))
    _extrapolation_plot(results, out)  # linked from its own section
    return paths


def _loss_series(rows: dict[str, list[dict]], key: str) -> list[dict]:
    """Per variant, in its own colour: the training loss smoothed (EMA: per-step losses of one batch are
    noisy, and every variant sees the same batches, so raw curves coincide and jump together) and the
    held-out loss at each evaluation (points)."""

    series = []
    for i, (variant, rs) in enumerate(rows.items()):
        tr = [m for m in rs if m.get("type") == "train" and m.get("loss") is not None and key in m]
        ev = [m for m in rs if m.get("type") == "eval" and m.get("loss") is not None and key in m]
        # smoothing in proportion to the points logged: a 0.9 EMA over six points lags the last loss by most
        # of the curve's drop, so a short run is drawn nearly raw
        beta = min(0.9, max(0.0, 1 - 5 / max(len(tr), 1)))
        series.append({"x": [m[key] for m in tr], "y": ema([m["loss"] for m in tr], beta), "color": f"C{i}",
                       "label": f"{variant} train" + (f" (EMA {beta:.2f})" if beta else "")})
        if ev:  # with the 95% interval over held-out sequences: differences inside it are not findings
            cis = [m.get("loss_ci") or [m["loss"], m["loss"]] for m in ev]
            series.append({"x": [m[key] for m in ev], "y": [m["loss"] for m in ev], "style": "o--", "color": f"C{i}",
                           "yerr": ([m["loss"] - c[0] for m, c in zip(ev, cis)], [c[1] - m["loss"] for m, c in zip(ev, cis)]),
                           "label": f"{variant} held-out (95% interval)"})
    return series
