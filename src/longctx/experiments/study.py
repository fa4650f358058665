"""The statistics of a comparison and the conclusions they allow (the report's "What this run shows").

Every variant is scored on the same held-out sequences (pretraining) and the same test examples (each
finetuning task), with the same seeds, so each question "is A better than B?" is a paired one
(``longctx.stats``): per seed and example the difference of the two scores, with an interval that holds the
example noise and, with several seeds, the training noise between seeds. Columns: the pretraining loss
(lower is better) and each finetuned task's primary metric (higher is better); with two RULER tasks or more,
``RULER``: per pretraining seed, each variant's per-example scores of every ruler_* task side by side (the same
examples for every variant, so the column is paired like the others), the RULER suite's ranking beside the
downstream tasks' and the LRA tasks' (trained from scratch).

For every column:
- ``vs_reference``: each variant against the comparison's reference, Holm-corrected over the family of
  comparisons, each labelled "better", "worse" or "not separated";
- ``pairwise``: every pair, Holm over all pairs; a variant's rank is 1 + the number of variants separated
  ahead of it, so variants that are not separated share ranks (ties);
and between every two columns Kendall's tau of the variants' mean scores with a bootstrap interval over seeds
and examples. ``findings`` are the sentences the report prints, computed from these and nothing else,
among them which synthetic suite (LRA, RULER) agrees with each downstream task at this size (``suites``).
"""
from __future__ import annotations

import numpy as np

from longctx import stats

LEVEL = 0.95
RULER = "RULER"  # the column of every ruler_* task's examples pooled


def _by_pretraining_seed(rows, seeds: int) -> np.ndarray:
    """(P x K, N) scores of P pretraining seeds x K finetuning seeds each -> (P, N), each row the mean over
    that pretrained model's finetunings: the pretraining seed is the independent unit (finetunings of one
    model share its pretraining noise, so counting them as seeds would understate the spread)."""
    a = np.asarray(rows, float)
    if a.shape[0] % seeds:
        raise ValueError(f"{a.shape[0]} score rows are not a whole number of finetunings of {seeds} pretraining seeds")
    return a.reshape(seeds, a.shape[0] // seeds, a.shape[1]).mean(axis=1)


def columns(results: list[dict]) -> dict[str, dict]:
    """{column: {"scores": {variant: (pretraining seeds, examples) array}, "higher_is_better", "metric",
    "from_scratch"}} for every column whose every variant has per-example scores."""
    cols = {}
    p = len(results[0].get("seeds") or [0])
    per = {r["variant"]: r["eval"].get("per_example") for r in results}
    if all(p is not None for p in per.values()):
        cols["pretraining loss"] = {"scores": {v: _by_pretraining_seed(x, p) for v, x in per.items()},
                                    "higher_is_better": False, "metric": "held-out loss", "from_scratch": False}
    tasks = list(dict.fromkeys(t for r in results for t in (r.get("finetune") or {})))
    # columns read left to right: pretraining, the tasks finetuned from it, then the LRA-style tasks trained
    # from scratch (each group in the config's order)
    tasks.sort(key=lambda t: any((r.get("finetune") or {}).get(t, {}).get("from_scratch") for r in results))
    for t in tasks:
        fts = {r["variant"]: (r.get("finetune") or {}).get(t) for r in results}
        if any(ft is None or "per_example" not in ft["test"] for ft in fts.values()):
            continue
        first = next(iter(fts.values()))
        name = f"{t} (LRA, from scratch)" if first["from_scratch"] else t
        cols[name] = {"scores": {v: _by_pretraining_seed(ft["test"]["per_example"], p) for v, ft in fts.items()},
                      "higher_is_better": True, "metric": first["metric"], "from_scratch": first["from_scratch"]}
    # a column is usable only when every variant has the same seeds x examples shape, with 2 examples or more
    cols = {k: c for k, c in cols.items()
            if len({a.shape for a in c["scores"].values()}) == 1 and next(iter(c["scores"].values())).shape[1] >= 2}
    ruler = [k for k in cols if k.startswith("ruler_")]
    if len(ruler) >= 2:  # the RULER suite as one column, right after its tasks
        at = list(cols).index(ruler[-1]) + 1
        suite = {RULER: {"scores": {v: np.concatenate([cols[k]["scores"][v] for k in ruler], axis=1)
                                    for v in cols[ruler[0]]["scores"]},
                         "higher_is_better": True, "from_scratch": False,
                         "metric": _pooled(ruler, [cols[k]["metric"] for k in ruler])}}
        cols = dict(list(cols.items())[:at] + list(suite.items()) + list(cols.items())[at:])
    return cols


def _pooled(tasks: list[str], metrics: list[str]) -> str:
    """``f1 pooled over ruler_niah_single, ruler_vt`` (each task's metric when they differ)."""
    if len(set(metrics)) == 1:
        return f"{metrics[0]} pooled over {', '.join(tasks)}"
    return "pooled " + ", ".join(f"{t} {m}" for t, m in zip(tasks, metrics))


def analyse(results: list[dict], reference: str, level: float = LEVEL) -> dict:
    cols = columns(results)
    out = {"reference": reference, "level": level, "columns": {}, "kendall_tau": {}}
    for name, c in cols.items():
        pairs = _plain(stats.pairwise(c["scores"], higher_is_better=c["higher_is_better"], level=level))
        ref = stats.compare_to_reference(c["scores"], reference, higher_is_better=c["higher_is_better"], level=level)
        out["columns"][name] = {"metric": c["metric"], "higher_is_better": c["higher_is_better"],
                                "from_scratch": c["from_scratch"], "vs_reference": _plain(ref),
                                "pairwise": pairs, "ranks": stats.ranks_from_pairwise(list(c["scores"]), pairs),
                                "shape": list(next(iter(c["scores"].values())).shape)}
    names = list(cols)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            t = stats.kendall_tau_interval(cols[a]["scores"], cols[b]["scores"], higher_x=cols[a]["higher_is_better"],
                                           higher_y=cols[b]["higher_is_better"], level=level)
            out["kendall_tau"][f"{a} vs {b}"] = {"tau": t["tau"], "ci": t["ci"]}
    out["findings"] = findings(out)
    return out


def _plain(x):
    """numpy scalars and arrays as JSON values."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def _fmt(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def findings(st: dict) -> list[str]:
    """The conclusions the statistics allow, one sentence per column and per pair of rankings."""
    ref, pct = st["reference"], f"{st['level']:.0%}"
    lines = []
    for name, c in st["columns"].items():
        rows = c["vs_reference"]["rows"]
        by = {lab: [v for v, r in rows.items() if r["label"] == lab] for lab in ("better", "worse", "not separated")}
        parts = [f"{lab} than {ref}: " + ", ".join(f"{v} ({_fmt(rows[v])})" for v in by[lab])
                 for lab in ("better", "worse") if by[lab]]
        if by["not separated"]:
            parts.append(f"not separated from {ref}: " + ", ".join(by["not separated"]))
        s, n = c["shape"]
        what = "held-out loss" if name == "pretraining loss" else f"{name} test {c['metric']}"
        lines.append(f"**{what}** ({s} seed{'s' if s > 1 else ''} x {n} examples, paired differences, Holm over "
                     f"{len(rows)} comparisons at family-wise {pct}): " + "; ".join(parts) + ".")
        seps = [f"{k.replace(' vs ', ' ahead of ')}" if r["label"] == "better" else
                " ahead of ".join(reversed(k.split(" vs "))) for k, r in c["pairwise"].items()
                if r["label"] != "not separated"]
        lines.append(f"  All pairs ({len(c['pairwise'])}, Holm): " + ("; ".join(seps) if seps else "no pair separated")
                     + ". Ranks with ties: " + ", ".join(f"{v} {k}" for v, k in sorted(c["ranks"].items(),
                                                                                      key=lambda x: x[1])) + ".")
    for key, t in st["kendall_tau"].items():
        lo, hi = t["ci"]
        verdict = ("the rankings agree" if lo > 0 else "the rankings disagree" if hi < 0 else
                   "the interval holds 0: this run cannot tell whether they agree")
        if t["tau"] != t["tau"]:
            verdict = "undefined (a ranking is all ties)"
        lines.append(f"Kendall's tau, {key}: {t['tau']:+.2f} [{lo:+.2f}, {hi:+.2f}]: {verdict}.")
    return lines + suite_lines(st)


def _tau(st: dict, a: str, b: str) -> dict | None:
    return st["kendall_tau"].get(f"{a} vs {b}") or st["kendall_tau"].get(f"{b} vs {a}")


def suites(st: dict) -> dict:
    """{downstream column: {suite: {"verdict": agrees | disagrees | cannot tell, "columns": {column: tau}}}}:
    the synthetic suites are LRA (the tasks trained from scratch) and RULER (its pooled column, or its one
    task); the downstream columns the other finetuned tasks. A suite agrees with a downstream task when the
    tau interval of each of its columns lies above 0, disagrees when each lies below, else cannot tell."""
    cols = st["columns"]
    ruler = [RULER] if RULER in cols else [k for k in cols if k.startswith("ruler_")]
    groups = {"LRA": [k for k, c in cols.items() if c["from_scratch"]], "RULER": ruler}
    groups = {g: ks for g, ks in groups.items() if ks}
    down = [k for k, c in cols.items() if k != "pretraining loss" and not c["from_scratch"] and k != RULER
            and not k.startswith("ruler_")]
    out = {}
    for d in down:
        out[d] = {}
        for g, ks in groups.items():
            taus = {k: _tau(st, d, k) for k in ks}
            if any(t is None for t in taus.values()):
                continue
            los, his = [t["ci"][0] for t in taus.values()], [t["ci"][1] for t in taus.values()]
            verdict = ("agrees" if all(lo > 0 for lo in los) else "disagrees" if all(hi < 0 for hi in his)
                       else "cannot tell")  # NaN bounds (a ranking all ties) compare False: cannot tell
            out[d][g] = {"verdict": verdict, "columns": taus}
    return out


def suite_lines(st: dict) -> list[str]:
    """One sentence per downstream task: which synthetic suite agrees with it at this size."""
    lines = []
    for d, by in suites(st).items():
        if not by:
            continue
        agree = [g for g, s in by.items() if s["verdict"] == "agrees"]
        detail = "; ".join(f"{g}: " + ", ".join(f"{k} {t['tau']:+.2f} [{t['ci'][0]:+.2f}, {t['ci'][1]:+.2f}]"
                                                for k, t in s["columns"].items()) + f" ({s['verdict']})"
                           for g, s in by.items())
        head = (f"{' and '.join(agree)} agree{'s' if len(agree) == 1 else ''} with {d}" if agree else
                f"no synthetic suite is shown to agree with {d}")
        lines.append(f"**Which synthetic suite agrees with downstream** at this size: {head} (Kendall's tau of the "
                     f"rankings, {st['level']:.0%} interval; {detail}).")
    return lines
