"""The comparison report: results.json (machine-readable), report.md (the table people read) and plots."""
from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

from longctx.train.loop import read_metrics


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def table(results: list[dict]) -> str:
    base = results[0]
    clm = any(r["objective"] == "clm" for r in results)
    head = ["variant", "attention", "params", "held-out loss", "bits/char" if clm else "perplexity",
            "tokens/s", "speed vs " + base["variant"], "peak memory", "train time", "attn GFLOP/token"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ev = r["eval"]
        quality = f"{ev['bits_per_char']:.3f}" if clm else f"{ev['perplexity']:.1f}"
        rows.append("| " + " | ".join([
            r["variant"], r["attention"], f"{r['parameters'] / 1e6:.2f}M", f"{ev['loss']:.4f}", quality,
            f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
            f"{r['peak_memory_bytes'] / 2**30:.2f} GiB", f"{r['train_time_s']:.0f} s",
            f"{r['attention_flops_per_token'] / 1e9:.4f}"]) + " |")
    return "\n".join(rows)


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, lengths = _extrapolation_lines(results)
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, name, run in lines:
        pts = [(row["length"], row["perplexity"]) for row in run["rows"] if "perplexity" in row]
        ax.plot(*zip(*pts), "o--" if run["blockwise"] else "o-",
                label=variant + (" + blockwise" if run["blockwise"] else ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity (same tokens at every length)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "perplexity_vs_length.png", dpi=100)
    plt.close(fig)
    return out / "perplexity_vs_length.png"


def write_report(comp: dict, results: list[dict], out: Path) -> dict:
    base = comp["base"]
    summary = {
        "name": comp["name"],
        "controlled": {"seed": base["seed"], "corpus": str(base["data"]["corpus"]), "seq_len": base["data"]["seq_len"],
                       "steps": base["train"]["steps"], "batch_size": base["train"]["batch_size"],
                       "tokens_per_variant": results[0]["tokens"], "objective": base["objective"]},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "variants": results,
    }
    if any(r.get("finetune") for r in results):  # downstream scores and the rankings they give
        from longctx.tasks.downstream import ranking
        summary["ranking"] = ranking(results)
    _atomic_write(out / "results.json", json.dumps(summary, indent=1))
    plots = _plots(results, out)
    c = summary["controlled"]
    md = [f"# Comparison: {comp['name']}", "",
          f"Every variant: {c['objective'].upper()} on `{c['corpus']}`, sequence length {c['seq_len']}, "
          f"{c['steps']} steps of batch {c['batch_size']} ({c['tokens_per_variant']:,} tokens), seed {c['seed']}, "
          f"same data in the same order. Held-out loss on documents never trained on.", "",
          table(results), "",
          "Tokens/s: training tokens per second of training-step time (evaluation and checkpoints excluded). "
          "Peak memory: the variant process's peak resident memory (CPU) or peak allocated GPU memory. "
          "Attention GFLOP/token: forward QK^T and PV over the pairs the pattern allows.", ""]
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
    if any(r.get("analysis") for r in results):  # StructFormer: where each variant's attention goes
        from longctx.eval.analysis import compare_lines
        md += [""] + compare_lines(results, out)
    md += ["", f"Machine: {summary['machine']['platform']}, {summary['machine']['cpus']} CPUs.", ""]
    _atomic_write(out / "report.md", "\n".join(md))
    return summary


def _plots(results: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {r["variant"]: [m for m in read_metrics(out / r["variant"] / "metrics.jsonl") if m["type"] == "train"]
              for r in results}
    paths = []
    for key, label, name in [("step", "step", "loss_vs_steps.png"), ("train_time", "training time (s)", "loss_vs_time.png")]:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for variant, rows in curves.items():
            ax.plot([m[key] for m in rows], [m["loss"] for m in rows], label=variant)
        ax.set_xlabel(label)
        ax.set_ylabel("training loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["variant"] for r in results]
    axes[0].bar(names, [r["tokens_per_s"] for r in results], color="tab:blue")
    axes[0].set_ylabel("training tokens/s")
    axes[1].bar(names, [r["peak_memory_bytes"] / 2**30 for r in results], color="tab:orange")
    axes[1].set_ylabel("peak memory (GiB)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "speed_memory.png", dpi=100)
    plt.close(fig)
    paths.append(out / "speed_memory.png")
    _extrapolation_plot(results, out)  # linked from its own section
    return paths
