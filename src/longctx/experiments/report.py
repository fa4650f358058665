"""The comparison report: results.json (machine-readable), report.md (the table people read) and plots."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from longctx.io import read_jsonl, write_text


def _with_ci(value: float, ci) -> str:
    """``5.5904 [5.55, 5.63]``: a figure and its 95% interval, when there is one."""
    return f"{value:.4f}" if not ci else f"{value:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table(results: list[dict]) -> str:
    base = results[0]
    clm = any(r["objective"] == "clm" for r in results)
    # under a FLOPs or time budget the steps differ between variants: show what each one spent
    budgeted = any(r.get("budget") for r in results)
    head = ["variant", "attention", "params", "held-out loss", "bits/char" if clm else "perplexity",
            "tokens/s", "speed vs " + base["variant"], "peak memory", "train time", "attn MFLOP/token"]
    head += ["steps", "tokens", "train FLOPs"] if budgeted else []
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ev = r["eval"]
        quality = f"{ev['bits_per_char']:.3f}" if clm else f"{ev['perplexity']:.1f}"
        rows.append("| " + " | ".join([
            r["variant"], r["attention"], f"{r['parameters'] / 1e6:.2f}M", _with_ci(ev["loss"], ev.get("loss_ci")), quality,
            f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
            f"{r['peak_memory_bytes'] / 2**30:.2f} GiB", f"{r['train_time_s']:.0f} s",
            f"{r['attention_flops_per_token'] / 1e6:,.3f}"] + (_spent(r) if budgeted else [])) + " |")
    return "\n".join(rows)


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
    from longctx.plots import line_figure

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
    from longctx.experiments.compute import short
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


def write_report(comp: dict, results: list[dict], out: Path) -> dict:
    base = comp["base"]
    budget = _budget(comp)
    summary = {
        "name": comp["name"],
        "controlled": {"seed": base["seed"], "corpus": str(base["data"]["corpus"]), "seq_len": base["data"]["seq_len"],
                       "steps": None if budget else base["train"]["steps"], "batch_size": base["train"]["batch_size"],
                       "tokens_per_variant": None if budget else results[0]["tokens"], "budget": budget,
                       "objective": base["objective"]},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "variants": results,
    }
    if any(r.get("finetune") for r in results):  # downstream scores and the rankings they give
        from longctx.tasks.downstream import ranking
        summary["ranking"] = ranking(results)
    write_text(out / "results.json", json.dumps(summary, indent=1))
    plots = _plots(results, out)
    c = summary["controlled"]
    md = [f"# Comparison: {comp['name']}", "", _controlled_line(c), "",
          table(results), "",
          "Tokens/s: training tokens per second of training-step time (evaluation and checkpoints excluded). "
          "Peak memory: the variant process's peak resident memory (CPU) or peak allocated GPU memory. "
          "Held-out loss: 95% bootstrap interval over held-out sequences in brackets. Attention MFLOP/token: forward QK^T and PV over the pairs the pattern allows. "
          "Loss plots: the training loss smoothed (EMA, beta 0.9) and the held-out loss at each evaluation (points)."
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
    if summary.get("ranking"):
        from longctx.tasks.downstream import report_lines
        md += [""] + report_lines(results, summary["ranking"])
    if comp.get("compute"):  # score against pretraining compute, one line per variant
        from longctx.experiments import compute
        md += [""] + compute.report_lines(results, comp["compute"], out)
    if any(r.get("analysis") for r in results):  # StructFormer: where each variant's attention goes
        from longctx.eval.analysis import compare_lines
        md += [""] + compare_lines(results, out)
    md += ["", f"Machine: {summary['machine']['platform']}, {summary['machine']['cpus']} CPUs.", ""]
    write_text(out / "report.md", "\n".join(md))
    return summary


def _plots(results: list[dict], out: Path) -> list[Path]:
    from longctx.plots import bar_figure, line_figure

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
    from longctx.plots import ema

    series = []
    for i, (variant, rs) in enumerate(rows.items()):
        tr = [m for m in rs if m.get("type") == "train" and m.get("loss") is not None and key in m]
        ev = [m for m in rs if m.get("type") == "eval" and m.get("loss") is not None and key in m]
        series.append({"x": [m[key] for m in tr], "y": ema([m["loss"] for m in tr]), "color": f"C{i}",
                       "label": f"{variant} train (EMA)"})
        if ev:
            series.append({"x": [m[key] for m in ev], "y": [m["loss"] for m in ev], "style": "o--", "color": f"C{i}",
                           "label": f"{variant} held-out"})
    return series
