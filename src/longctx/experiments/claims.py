"""The four papers' claims, measured: each claim reads the results of the run its recipe writes, and states
the paper's figure, the measured figure with its 95% interval and a verdict computed from the statistics.

A claim is one or more *parts*; each part is a quantity with an interval and a rule:

- ``greater(est, ci, t, none=t)``: the claim says the quantity exceeds t (its size); ``none`` is the value
  of no effect (0 for a difference, 1 for a ratio; the same as t when the claim is a direction only).
  "holds" when the whole interval is above t, "holds in direction only" when the estimate is above ``none``
  but the interval does not clear t (the right direction, the size not shown), "not reproduced at this
  size" when the estimate is not above ``none``;
- ``less(est, ci, t, none=t)``: the mirror image;
  For an "at least as good" claim the size is the margin (-0.05 F1) and so is the no-effect line: the
  direction is "not worse by more than the margin";
- ``not_worse(est, ci, tolerance)``: "the same or better" for a quantity where lower is better (a loss
  difference, new minus old): "holds" when the interval's upper end is at most the tolerance, "holds in
  direction only" when the estimate is (not worse by more than the tolerance, the interval reaching past
  it), "not reproduced at this size" when the estimate is above the tolerance;
- ``within(est, ci, lo, hi)``: an equivalence ("matches"): "holds" when the whole interval lies inside
  [lo, hi], "holds in direction only" when the estimate does, "not reproduced at this size" otherwise.

A part measured without an interval (one number) can at most hold "in direction only". A claim's verdict is
its weakest part's. Each part's interval is at 95% on its own (no correction across the claims).

The paired differences come from ``longctx.stats`` (the same seeds and examples on both sides), read from the
study a comparison wrote (``results.json``'s ``study``) or computed here from per-example scores.
``longctx claims`` writes docs/claims.md from whatever runs exist under ``--runs``; a claim whose run is
missing is listed with the command that makes it.
"""
from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from longctx.eval.analysis import overall

from longctx.stats import paired_difference

HOLDS, DIRECTION, NOT_REPRODUCED = "holds", "holds in direction only", "not reproduced at this size"
ORDER = (HOLDS, DIRECTION, NOT_REPRODUCED)


def greater(est: float, ci, threshold: float, none: float | None = None) -> str:
    none = threshold if none is None else none
    if none > threshold:
        raise ValueError(f"the no-effect line {none} lies beyond the claimed size {threshold}")
    if not est > none:  # also where a percentile interval (tau's) does not hold its own estimate
        return NOT_REPRODUCED
    return HOLDS if ci is not None and ci[0] > threshold else DIRECTION


def less(est: float, ci, threshold: float, none: float | None = None) -> str:
    return greater(-est, None if ci is None else [-ci[1], -ci[0]], -threshold, None if none is None else -none)


def not_worse(est: float, ci, tolerance: float) -> str:
    if not est <= tolerance:  # also nan
        return NOT_REPRODUCED
    return HOLDS if ci is not None and ci[1] <= tolerance else DIRECTION


def within(est: float, ci, lo: float, hi: float) -> str:
    if not lo < est < hi:
        return NOT_REPRODUCED
    return HOLDS if ci is not None and lo < ci[0] and ci[1] < hi else DIRECTION


def weakest(verdicts) -> str:
    return max(verdicts, key=ORDER.index)


@dataclass
class Part:
    what: str          # the quantity, in words
    paper: str         # the paper's figure
    ours: str          # the measured figure with its interval
    verdict: str
    in_verdict: bool = True  # False: reported beside the claim, not part of it


@dataclass
class Claim:
    key: str
    paper: str                          # which paper (SEEDS.md)
    statement: str                      # the claim, as the rule tests it
    command: str                        # the recipe
    run: str                            # the folder under --runs its command writes
    measure: Callable[[dict], list[Part]]

    def evaluate(self, runs: Path) -> dict:
        path = Path(runs) / self.run / "results.json"
        row = {"key": self.key, "paper": self.paper, "statement": self.statement, "command": self.command}
        if not path.exists():
            return {**row, "verdict": "not run", "parts": []}
        results = json.loads(path.read_text())
        try:
            parts = self.measure(results)
        except (KeyError, StopIteration, IndexError) as e:  # a run made with other settings than the recipe
            what = f"no {e}" if isinstance(e, KeyError) else "a missing variant or row"
            return {**row, "verdict": "not run as the recipe", "parts": [vars(Part(
                "the run", "", f"{self.run}/results.json lacks what the claim reads ({what}): it was made with other "
                f"settings than the recipe; rerun the command as printed", "not run as the recipe"))],
                    "date": results.get("date") or _date(path), "machine": results.get("machine")}
        return {**row, "verdict": weakest(p.verdict for p in parts if p.in_verdict), "parts": [vars(p) for p in parts],
                "date": results.get("date") or _date(path), "machine": results.get("machine")}


def _date(path: Path) -> str:
    return datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()


def _ci(ci, fmt: str = "{:+.3f}") -> str:
    return "[" + ", ".join(fmt.format(x) for x in ci) + "]" if ci is not None else "(no interval)"


def _paired(a, b) -> tuple[float, list[float]]:
    """mean(a - b) of two score rows on the same examples (one seed), with its interval (longctx.stats)."""
    r = paired_difference([np.asarray(a, float)], [np.asarray(b, float)], higher_is_better=True)
    return r["diff"], r["ci"]


# -- LeX (seed 003): length extrapolation ---------------------------------------------------------------
def _lex_rows(results: dict, position: str, setting: str) -> dict[int, dict]:
    v = next(v for v in results["variants"] if v["name"] == position)
    ext = v["extrapolation"]
    return {r["length"]: r for r in ext["runs"][setting]["rows"] if "skipped" not in r}, ext["training_length"]


def _growth(rows: dict, L: int, m: int):
    """Perplexity at m x L over perplexity at L on the same documents: exp of the mean per-document loss
    difference, with its interval."""
    d, ci = _paired(rows[m * L]["per_example"], rows[L]["per_example"])
    return math.exp(d), [math.exp(ci[0]), math.exp(ci[1])]


def measure_lex(results: dict) -> list[Part]:
    rope, L = _lex_rows(results, "rope", "plain")
    xpos, _ = _lex_rows(results, "xpos", "blockwise")
    xpos_plain, _ = _lex_rows(results, "xpos", "plain")
    top = max(n for n in xpos) // L
    parts = []
    g, ci = _growth(rope, L, 4)
    parts.append(Part("RoPE perplexity at 4L / at L (size: 2x; none: 1x)", "294 / 25.5 = 11.5x",
                      f"{g:.2f}x {_ci(ci, '{:.2f}')} ({rope[4 * L]['perplexity']:.2f} / {rope[L]['perplexity']:.2f}; "
                      f"{_growth(rope, L, top)[0]:.2f}x at {top}L)", greater(g, ci, 2.0, none=1.0)))
    g, ci = _growth(xpos, L, 4)
    parts.append(Part("xPos + blockwise perplexity at 4L / at L (within 5%)", "20.7 / 23.3 = 0.89x",
                      f"{g:.3f}x {_ci(ci, '{:.3f}')} ({xpos[4 * L]['perplexity']:.2f} / {xpos[L]['perplexity']:.2f}; "
                      f"{_growth(xpos, L, top)[0]:.3f}x at {top}L)", less(g, ci, 1.05)))
    # the paper's resolution is at 2L (2,048 for L = 1,024)
    res_b, res_p = xpos[2 * L].get("attention_resolution"), xpos_plain[2 * L].get("attention_resolution")
    if res_b is not None and res_p is not None:  # measured on two documents: no interval
        parts.append(Part("attention resolution at 2L, xPos with blockwise attention vs without", "1.08 vs 0.54",
                          f"{res_b:.3f} vs {res_p:.3f} (2 documents, no interval)", greater(res_b - res_p, None, 0.0)))
    return parts


# -- the study (seed 000): local attention, blocks at half the compute, LRA vs downstream -------------------
MARGIN_F1 = 0.05  # "at least as good" / "matches": within 0.05 F1 (absolute)


def _pair(column: dict, a: str, b: str) -> tuple[float, list[float]]:
    """a minus b in a study column's pairwise results (oriented as asked)."""
    pairs = column["pairwise"]
    if f"{a} vs {b}" in pairs:
        r = pairs[f"{a} vs {b}"]
        return r["diff"], r["ci"]
    r = pairs[f"{b} vs {a}"]
    return -r["diff"], [-r["ci"][1], -r["ci"][0]]


def measure_study(results: dict) -> list[Part]:
    st = results["study"]
    qa = st["columns"]["qa"]
    local = st["reference"]
    parts = []
    for other in (v["variant"] for v in results["variants"]):
        if other in (local, "full", "sliding"):
            continue
        d, ci = _pair(qa, local, other)
        parts.append(Part(f"QA F1, {local} minus {other} (not below -{MARGIN_F1})", "local >= every efficient family",
                          f"{d:+.3f} {_ci(ci)}", greater(d, ci, -MARGIN_F1)))
    key = next((k for k in st["kendall_tau"] if "qa" in k.split(" vs ") and "LRA" in k), None)
    if key is not None:
        tau = st["kendall_tau"][key]
        parts.append(Part(f"Kendall's tau, {key} (below 0.5)", "LRA's ranking disagrees",
                          f"{tau['tau']:+.2f} {_ci(tau['ci'], '{:+.2f}')}", less(tau["tau"], tau["ci"], 0.5)))
    return parts


def measure_compute(results: dict) -> list[Part]:
    """Blocks at the smaller budget against Longformer-style attention at the larger one, QA F1, read from
    the study's pair (the same test examples and pretraining seeds, finetunings of one model averaged)."""
    by = {(v["compute"]["variant"], v["compute"]["budget"]): v["variant"] for v in results["variants"]}
    budgets = sorted({b for _, b in by})
    small, large = budgets[0], budgets[-1]
    d, ci = _pair(results["study"]["columns"]["qa"], by[("blocks", small)], by[("sliding-global", large)])
    return [Part(f"QA F1, blocks at {small:.0e} FLOPs minus sliding-global at {large:.0e} (within +-{MARGIN_F1})",
                 "blocks match Longformer at half its pretraining compute", f"{d:+.3f} {_ci(ci)}",
                 within(d, ci, -MARGIN_F1, MARGIN_F1))]


# -- Longformer (seed 002): conversion, char-LM ablations ----------------------------------------------------
def measure_conversion(results: dict) -> list[Part]:
    """In bits per masked character (byte tokens: loss / ln 2), the paper's unit."""
    ev = results["evaluations"]
    n = results["long_length"]
    bits = {k: np.asarray(ev[k]["per_example"]) / math.log(2) for k in ("copy", "random")}
    d, ci = _paired(bits["random"], bits["copy"])
    b = {k: ev[k]["loss"] / math.log(2) for k in ("short", "copy", "random")}
    return [Part(f"MLM bits per character at {n} tokens, random new positions minus copied (size: 1 bit; none: 0)",
                 "10.299 - 1.957 = 8.34", f"{d:+.3f} {_ci(ci)} (copy {b['copy']:.3f}, random {b['random']:.3f}; "
                 f"the short model at {results['short_length']}: {b['short']:.3f})", greater(d, ci, 1.0, none=0.0))]


def _bpc_pair(results: dict, a: str, b: str) -> tuple[float, list[float]]:
    """a minus b in held-out bits per character (byte tokens: loss / ln 2)."""
    d, ci = _pair(results["study"]["columns"]["pretraining loss"], a, b)
    return d / math.log(2), [c / math.log(2) for c in ci]


def measure_windows(results: dict) -> list[Part]:
    d, ci = _bpc_pair(results, "increasing", "decreasing")
    return [Part("dev BPC, windows increasing minus decreasing with depth (below 0)", "1.21 vs 1.24",
                 f"{d:+.4f} {_ci(ci, '{:+.4f}')}", less(d, ci, 0.0))]


def measure_dilation(results: dict) -> list[Part]:
    d, ci = _bpc_pair(results, "dilation-top", "no-dilation")
    return [Part("dev BPC, dilation on two heads of the top layers minus none (below 0)", "1.20 vs 1.21",
                 f"{d:+.4f} {_ci(ci, '{:+.4f}')}", less(d, ci, 0.0))]


STAGED_TOLERANCE_BPC = 0.02  # "the same or better": staged not worse than one phase by more than 0.02 BPC


def measure_staged(results: dict) -> list[Part]:
    """Staged training (phases doubling length and window, halving the learning rate) against one phase at
    the final length, at the same compute (configs/longformer-charlm-staged-vs-one.yaml): the paired held-out
    BPC difference at the final length decides; each arm's BPC and the FLOPs each spent are reported beside it."""
    d, ci = _bpc_pair(results, "staged", "one-phase")
    by = {v["variant"]: v for v in results["variants"]}
    arms = {k: by[k] for k in ("staged", "one-phase")}
    n = arms["one-phase"]["seq_len"]
    parts = [Part(f"dev BPC at {n} characters, staged minus one-phase at the same FLOPs "
                  f"(at most +{STAGED_TOLERANCE_BPC} BPC)", "staged: the same or better BPC (no one-phase figure)",
                  f"{d:+.4f} {_ci(ci, '{:+.4f}')}", not_worse(d, ci, STAGED_TOLERANCE_BPC))]
    bpc = []
    for k, v in arms.items():
        ev = v["eval"]
        b = ev["loss"] / math.log(2)
        bpc.append(f"{k} {b:.4f}" + (f" {_ci([c / math.log(2) for c in ev['loss_ci']], '{:.4f}')}"
                                     if ev.get("loss_ci") else ""))
    parts.append(Part("dev BPC of each arm (mean over seeds)", "(reported)", "; ".join(bpc), "(reported)",
                      in_verdict=False))
    f = {k: v.get("train_flops") for k, v in arms.items()}
    ours = "; ".join(f"{k} {x:.4g}" if x is not None else f"{k} not counted" for k, x in f.items())
    if None not in f.values():
        ours += f" (staged / one-phase = {f['staged'] / f['one-phase']:.4f})"
    parts.append(Part("training FLOPs each arm spent", "the same compute", ours, "(reported)", in_verdict=False))
    return parts


# -- StructFormer (seed 001): the 2 x 2 ---------------------------------------------------------------------
def measure_structformer(results: dict) -> list[Part]:
    """The 2 x 2 of configs/structformer.yaml: the effect of pretraining with global headings, once with the
    headings global at finetuning and once without (each paired on the same test examples); what global
    headings at finetuning make reachable is reported beside it, outside the verdict."""
    col = next(c for k, c in results["study"]["columns"].items() if k.startswith("section_heading"))
    parts = []
    for pre, base, how in (("headings-global", "text-only+ft-headings", "headings global at finetuning"),
                           ("headings-global+ft-text", "text-only", "headings not global at finetuning")):
        d, ci = _pair(col, pre, base)
        parts.append(Part(f"section-heading F1, pretrained with global headings minus without ({how})",
                          "StructFormer above its text-only twin", f"{d:+.3f} {_ci(ci)}", greater(d, ci, 0.0)))
    d, ci = _pair(col, "text-only+ft-headings", "text-only")
    parts.append(Part("section-heading F1, headings global at finetuning minus not (text-only pretraining)",
                      "(reachability, outside the claim)", f"{d:+.3f} {_ci(ci)}", "(reported)", in_verdict=False))
    mass = {v["variant"]: overall(v["analysis"], "heading_share") for v in results["variants"] if v.get("analysis")}
    if mass.get("headings-global") is not None and mass.get("text-only") is not None:
        d = mass["headings-global"] - mass["text-only"]
        parts.append(Part("attention mass on heading tokens, pretrained with global headings minus without",
                          "more mass on headings", f"{mass['headings-global']:.3f} vs {mass['text-only']:.3f} "
                          "(one model each, no interval)", greater(d, None, 0.0)))
    return parts


CLAIMS = [
    Claim("lex", "LeX (seed 003)", "RoPE's perplexity grows beyond the training length L while xPos with "
          "blockwise causal attention stays within 5%; attention resolution is higher with blockwise attention",
          "longctx compare --config configs/lex-extrapolation.yaml", "lex", measure_lex),
    Claim("conversion", "Longformer (seed 002)", "a short model extended by copying its position embeddings keeps "
          "its masked-LM loss on long inputs where random new positions destroy it",
          "longctx claims conversion", "conversion", measure_conversion),
    Claim("charlm-windows", "Longformer (seed 002)", "windows increasing with depth beat decreasing ones (char LM)",
          "longctx compare --config configs/longformer-charlm-windows.yaml", "charlm-windows", measure_windows),
    Claim("charlm-dilation", "Longformer (seed 002)", "dilation on two heads of the top layers helps (char LM)",
          "longctx compare --config configs/longformer-charlm-dilation.yaml", "charlm-dilation", measure_dilation),
    Claim("charlm-staged", "Longformer (seed 002)", "staged training (phases doubling the length and the "
          "window, halving the learning rate) reaches the same or better BPC than one phase at the same compute "
          f"(char LM; not worse by more than {STAGED_TOLERANCE_BPC} BPC)",
          "longctx compare --config configs/longformer-charlm-staged-vs-one.yaml", "charlm-staged-vs-one",
          measure_staged),
    Claim("structformer", "StructFormer (seed 001)", "pretraining with heading tokens global raises the "
          "section-heading score, apart from what global headings at finetuning make reachable",
          "longctx compare --config configs/structformer.yaml", "structformer", measure_structformer),
    Claim("study", "efficient-attention study (seed 000)", "local attention is at least as good downstream as every "
          "efficient family after pretrain + finetune; LRA's ranking disagrees with the downstream one",
          "longctx compare", "default", measure_study),
    Claim("compute", "efficient-attention study (seed 000)", "disjoint blocks match Longformer-style attention "
          "at half the pretraining compute", "longctx compare --config configs/compute-blocks-vs-longformer.yaml",
          "compute-blocks", measure_compute),
]


def evaluate_all(runs: str | Path) -> list[dict]:
    return [c.evaluate(Path(runs)) for c in CLAIMS]


def markdown(rows: list[dict]) -> str:
    """docs/claims.md: one table, claim by claim and part by part."""
    out = ["# The papers' claims, measured", "",
           "Generated by `longctx claims` from the runs' `results.json` (nothing typed by hand): for each claim the",
           "command that makes its run, the paper's figure, ours with its 95% interval, and the verdict the rule",
           "computes (`longctx.experiments.claims`): \"holds\" when the 95% interval clears the size the claim states",
           "(in the part's name), \"holds in direction only\" when the estimate is on the claimed side of no effect but",
           "the interval does not clear that size (or there is no interval), \"not reproduced at this size\" otherwise;",
           "a claim's verdict is its weakest part's. The recipes are CPU-sized checks of each direction, not",
           "replications.", "",
           "| claim | command | part | paper | ours (95% interval) | verdict | run |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["parts"]:
            out.append(f"| {r['paper']}: {r['statement']} | `{r['command']}` | | | | {r['verdict']} | |")
            continue
        m = r.get("machine") or {}
        where = f"{r['date']}, {m.get('cpu', '?')} ({m.get('cpus', '?')} CPUs)"
        for i, p in enumerate(r["parts"]):
            head = (f"{r['paper']}: {r['statement']} (**{r['verdict']}**)", f"`{r['command']}`") if i == 0 else ("", "")
            out.append(f"| {head[0]} | {head[1]} | {p['what']} | {p['paper']} | {p['ours']} | {p['verdict']} | "
                       f"{where if i == 0 else ''} |")
    return "\n".join(out) + "\n"
