"""Statistics of a comparison: paired differences with an interval that holds both training noise (seeds)
and sampling noise (examples), Holm's correction over a family of comparisons, labels, ranks with ties
and Kendall's tau with an interval. docs/statistics.md gives the methods, why each, and the simulations
that chose them (tests/test_stats.py reruns them).

Every function takes scores as arrays of shape (S, N): row s is seed s (pretraining seed s and the
finetuning of that model with the same seed), column n is example n (a held-out sequence's loss, a test
example's F1 or 0/1 accuracy), the same examples in the same order for every variant.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

METHOD_ONE_SEED = "paired t over examples (one seed: training noise not measured)"
METHOD_SEEDS = "seeds x examples variance components, generalized pivotal interval"


def _table(scores, name: str) -> np.ndarray:
    """One variant's (S, N) score table, checked: a silent broadcast or a NaN would give a wrong answer."""
    x = np.asarray(scores, dtype=float)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"{name}: scores must have shape (seeds, examples) with at least 2 examples, "
                         f"got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: scores contain NaN or infinity")
    return x


def _paired_tables(a, b, names=("a", "b")) -> np.ndarray:
    a, b = _table(a, names[0]), _table(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]!r} has shape {a.shape} and {names[1]!r} has shape {b.shape}: a paired "
                         "comparison needs the same seeds and the same examples for both")
    return a - b


def _mean_squares(d: np.ndarray) -> list[tuple[float, int]]:
    """(mean square, degrees of freedom) of the two-way layout d[s, n] = mu + seed_s + example_n +
    resid_sn (ANOVA without replication): examples, then seeds and residual where S >= 2. Their
    expectations: MS_example = S var_example + var_resid, MS_seed = N var_seed + var_resid,
    MS_resid = var_resid, so Var(mean d) = (MS_seed - MS_resid + MS_example) / (S N)."""
    s, n = d.shape
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    parts = [(s * cols.var(ddof=1), n - 1)]
    if s > 1:
        resid = d - rows[:, None] - cols[None, :] + d.mean()
        parts += [(n * rows.var(ddof=1), s - 1), ((resid ** 2).sum() / ((s - 1) * (n - 1)), (s - 1) * (n - 1))]
    return parts


def _variance_draws(d: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Draws of Var(mean d) from its generalized pivotal quantity (Weerahandi 1993): each mean square
    ms with f degrees of freedom becomes ms f / chi2_f, then they are combined as in _mean_squares (the
    seed part clipped at 0). The 1-df seed mean square of two seeds keeps its whole uncertainty this
    way; a plug-in variance with one t quantile (Satterthwaite's or Banerjee's) undercovers there."""
    rng = np.random.default_rng(seed)
    pivots = [ms * f / rng.chisquare(f, resamples) for ms, f in _mean_squares(d)]
    s, n = d.shape
    seed_part = np.maximum(pivots[1] - pivots[2], 0.0) if s > 1 else 0.0
    return (pivots[0] + seed_part) / (s * n)


def _interval(diff: float, sd: np.ndarray, level: float) -> tuple[float, float]:
    """Half-width and p-value of mean d ~ diff + sd Z with sd drawn from its pivot: a scale mixture of
    normals (Student's t with N - 1 df for one seed). Averaging the normal probabilities over the draws,
    instead of taking quantiles of simulated means, gives smooth small p-values for Holm; p < 1 - level
    exactly when the interval at that level excludes 0 (the label and the interval never disagree)."""
    from scipy import optimize  # here: longctx.tasks.metrics re-exports kendall_tau and imports without scipy
    from scipy.stats import norm  # (as above)

    if not sd.any():  # every difference the same: no noise seen
        return 0.0, float(diff == 0)
    sd = sd[sd > 0]  # (a zero draw is a point mass at diff: it never covers 0 unless diff is 0)
    covered = lambda h: float(np.mean(2 * norm.cdf(h / sd) - 1))
    half = optimize.brentq(lambda h: covered(h) - level, 0.0, norm.isf((1 - level) / 2) * sd.max(), xtol=1e-14)
    return half, 1.0 - covered(abs(diff))


def paired_difference(a, b, *, higher_is_better: bool, level: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> dict:
    """Difference mean(a) - mean(b) of two variants scored on the same examples with the same seeds, with
    an interval at ``level`` that holds the examples' sampling noise and (with two seeds or more) the
    seeds' training noise. Returns {"diff", "ci": [lo, hi], "p" (two-sided), "n_seeds", "n_examples",
    "method", "higher_is_better"}; ``higher_is_better`` is recorded so a label can be read off it.
    ``resamples`` draws of the variance pivot, seeded: the same inputs give the same answer."""
    return _difference(_paired_tables(a, b), higher_is_better, level, resamples, seed)


def _difference(d: np.ndarray, higher_is_better: bool, level: float, resamples: int, seed: int) -> dict:
    s, n = d.shape
    diff = float(d.mean())
    half, p = _interval(diff, np.sqrt(_variance_draws(d, resamples, seed)), level)
    return {"diff": diff, "ci": [diff - half, diff + half], "p": p, "n_seeds": s, "n_examples": n,
            "method": METHOD_ONE_SEED if s == 1 else METHOD_SEEDS, "higher_is_better": higher_is_better}


def holm(pvalues, level: float = 0.05) -> dict:
    """Holm's (1979) step-down correction: the j-th smallest of m p-values is multiplied by m - j + 1,
    made non-decreasing along the order, capped at 1; a hypothesis is rejected where its adjusted
    p-value is <= level. It holds the family-wise error rate at ``level`` for any dependence between the
    tests (the comparisons here share a reference and examples) and rejects everything Bonferroni does."""
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1 or not ((p >= 0) & (p <= 1)).all():
        raise ValueError(f"holm needs a list of p-values in [0, 1], got {pvalues!r}")
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return {"adjusted": adjusted.tolist(), "reject": (adjusted <= level).tolist()}


def label(diff_result: dict, higher_is_better: bool, reject: bool) -> str:
    """"better", "worse" (a against b, in the metric's direction) or "not separated" (not rejected)."""
    if not reject:
        return "not separated"
    return "better" if (diff_result["diff"] > 0) == higher_is_better else "worse"


def compare_to_reference(scores: dict, reference: str, *, higher_is_better: bool, level: float = 0.95,
                         resamples: int = 2000, seed: int = 0) -> dict:
    """Every other variant against ``reference``: its paired difference (variant - reference), Holm's
    adjusted p-value over the family of these comparisons and a label at family-wise level 1 - ``level``.
    The interval is per comparison (at ``level``); the label is family-wise, so an interval that excludes
    0 next to "not separated" is a difference that does not survive the correction."""
    if reference not in scores:
        raise ValueError(f"reference {reference!r} is not among the variants {sorted(scores)}")
    others = [v for v in scores if v != reference]
    results = {v: _difference(_paired_tables(scores[v], scores[reference], (v, reference)), higher_is_better,
                              level, resamples, seed) for v in others}
    corrected = holm([results[v]["p"] for v in others], level=1 - level)
    rows = {}
    for v, p_holm, reject in zip(others, corrected["adjusted"], corrected["reject"]):
        rows[v] = {**results[v], "p_holm": p_holm, "label": label(results[v], higher_is_better, reject)}
    return {"reference": reference, "level": level, "family_size": len(others), "rows": rows}


def pairwise(scores: dict, *, higher_is_better: bool, level: float = 0.95, resamples: int = 2000,
             seed: int = 0) -> dict:
    """Every pair of variants compared by its paired difference, Holm over all pairs at family-wise level
    1 - ``level``: {"u vs v": paired_difference fields + p_holm + label (u against v)}."""
    names = list(scores)
    pairs = list(combinations(names, 2))
    results = [_difference(_paired_tables(scores[u], scores[v], (u, v)), higher_is_better, level, resamples, seed)
               for u, v in pairs]
    h = holm([r["p"] for r in results], level=1 - level)
    return {f"{u} vs {v}": {**r, "p_holm": adj, "label": label(r, higher_is_better, rej)}
            for (u, v), r, adj, rej in zip(pairs, results, h["adjusted"], h["reject"])}


def ranks_from_pairwise(names: list, pairs: dict) -> dict:
    """Rank of each variant = 1 + the number of variants separated ahead of it (``pairwise``'s labels).
    Variants that nothing separates share rank 1; in a chain A > B > C where only A and C are separated,
    A and B rank 1 and C ranks 2. Ranks are not dense (they count the variants that are surely better, not
    the distinct levels), and every rank is backed by tests that survive the correction."""
    ahead = {v: 0 for v in names}
    for key, r in pairs.items():
        u, v = key.split(" vs ")
        if r["label"] != "not separated":
            ahead[v if r["label"] == "better" else u] += 1
    return {v: 1 + ahead[v] for v in names}


def ranks_with_ties(scores: dict, *, higher_is_better: bool, level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> dict:
    """``ranks_from_pairwise`` of ``pairwise``."""
    return ranks_from_pairwise(list(scores), pairwise(scores, higher_is_better=higher_is_better, level=level,
                                                      resamples=resamples, seed=seed))


def mean_interval(scores, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> list[float]:
    """The interval of one variant's mean score over seeds and examples (``paired_difference`` against 0)."""
    return _difference(_table(scores, "scores"), True, level, resamples, seed)["ci"]


def rows_interval(rows, level: float = 0.95) -> list[float] | None:
    """``mean_interval`` of per-example score rows (one row per seed), or None where there is no interval to
    give: a row missing, rows of different lengths (runs on different examples), or fewer than 2 examples."""
    if not rows or any(r is None for r in rows) or len({len(r) for r in rows}) != 1 or len(rows[0]) < 2:
        return None
    return mean_interval(np.asarray(rows, dtype=float), level=level)


def _stack(scores: dict, names: list, what: str) -> np.ndarray:
    tables = [_table(scores[v], f"{what}[{v!r}]") for v in names]
    if len({t.shape for t in tables}) != 1:
        raise ValueError(f"{what}: every variant needs the same (seeds, examples) shape, got "
                         + ", ".join(f"{v} {t.shape}" for v, t in zip(names, tables)))
    return np.stack(tables)  # (V, S, N)


def _counts(rng, n: int, draws: int) -> np.ndarray:
    """How often each of n items is drawn in each of ``draws`` bootstrap samples of size n, (draws, n)."""
    picks = rng.integers(0, n, (draws, n)) + n * np.arange(draws)[:, None]
    return np.bincount(picks.ravel(), minlength=draws * n).reshape(draws, n).astype(float)


def _resampled_means(tables: np.ndarray, seed_counts: np.ndarray, rng) -> np.ndarray:
    """Each variant's mean under each bootstrap draw, (R, V): the seeds' draw is given (shared by both
    rankings), the examples are drawn here (the same draw for every variant, as they share examples)."""
    v, s, n = tables.shape
    per_seed = tables @ _counts(rng, n, len(seed_counts)).T  # (V, S, R): each seed's sum over drawn examples
    return np.einsum("rs,vsr->rv", seed_counts, per_seed) / (s * n)


def _tau_b_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between the rows of x and y, (R, V) each -> (R,): kendall_tau per row,
    vectorised over the bootstrap draws; nan where a row is constant."""
    i, j = np.triu_indices(x.shape[1], k=1)
    dx, dy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
    both = (dx != 0) & (dy != 0)
    concordant_minus_discordant = (dx * dy * both).sum(axis=1)
    denom = np.sqrt((dx != 0).sum(axis=1) * (dy != 0).sum(axis=1).astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, concordant_minus_discordant / denom, np.nan)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two score lists over the same items (ties in either list handled as
    tau-b does: tau = (C - D) / sqrt((n0 - n1) (n0 - n2))); nan when either list is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError("kendall_tau needs two lists of the same length")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    denom = np.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return float((concordant - discordant) / denom) if denom > 0 else float("nan")


def kendall_tau_interval(x: dict, y: dict, *, higher_x: bool, higher_y: bool, level: float = 0.95,
                         resamples: int = 2000, seed: int = 0) -> dict:
    """Kendall's tau-b between two rankings of the same variants (x and y: per-variant (S, N) score
    tables, each ranking with its own examples, both with the same seeds), with a percentile bootstrap
    interval: each draw resamples the seeds (one draw for both rankings: seed s is one trained model)
    and each ranking's examples (its own draw), recomputes every variant's mean and tau-b. Scores are
    oriented so that tau = 1 means the rankings agree on which variant is better."""
    names = list(x)
    if sorted(names) != sorted(y) or len(names) < 2:
        raise ValueError(f"kendall_tau_interval needs the same two or more variants in both rankings, got "
                         f"{sorted(x)} and {sorted(y)}")
    tx, ty = _stack(x, names, "x"), _stack(y, names, "y")
    if tx.shape[1] != ty.shape[1]:
        raise ValueError(f"x has {tx.shape[1]} seeds and y has {ty.shape[1]}: the rankings must share seeds")
    sign_x, sign_y = (1 if higher_x else -1), (1 if higher_y else -1)
    tau = kendall_tau(sign_x * tx.mean(axis=(1, 2)), sign_y * ty.mean(axis=(1, 2)))
    rng = np.random.default_rng(seed)
    s = tx.shape[1]
    seed_counts = _counts(rng, s, resamples)  # (R, S)
    taus = _tau_b_rows(sign_x * _resampled_means(tx, seed_counts, rng),
                       sign_y * _resampled_means(ty, seed_counts, rng))
    alpha = (1 - level) / 2
    if np.isnan(taus).all():  # a ranking is all ties in every draw (e.g. every variant scores 0): no interval
        return {"tau": tau, "ci": [float("nan"), float("nan")]}
    return {"tau": tau, "ci": [float(np.nanquantile(taus, alpha)), float(np.nanquantile(taus, 1 - alpha))]}
