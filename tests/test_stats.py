"""Statistics of a comparison against oracles (scipy's t-tests, Holm by hand, metrics.kendall_tau) and by
simulation: synthetic score tables with known seed-level and example-level noise, where the truth is
known, check the intervals' coverage, the false-positive rate, and why the methods were chosen over the
alternatives (docs/statistics.md quotes these figures)."""
import numpy as np
import pytest
from scipy import stats as scipy_stats

from longctx import stats
from longctx.tasks.metrics import kendall_tau

TRUE_DIFF = 0.1


def pair(rng, s, n, seed_sd, diff=TRUE_DIFF, example_sd=1.0, resid_sd=1.0):
    """Two variants' (S, N) tables on shared examples: a common example difficulty (cancels in a - b),
    each variant's own per-seed training offset (seed_sd), its own example effects (example_sd: which
    examples suit it) and per-(seed, example) noise (resid_sd)."""
    difficulty = rng.normal(0, 2.0, (1, n))

    def variant(mean):
        return (mean + difficulty + rng.normal(0, seed_sd, (s, 1)) + rng.normal(0, example_sd / np.sqrt(2), (1, n))
                + rng.normal(0, resid_sd / np.sqrt(2), (s, n)))

    return variant(diff), variant(0.0)


def coverage(interval, s, n, seed_sd, draws=300, seed=0):
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(draws):
        lo, hi = interval(*pair(rng, s, n, seed_sd))
        hits += lo <= TRUE_DIFF <= hi
    return hits / draws


def ours(a, b):
    return stats.paired_difference(a, b, higher_is_better=True, resamples=400)["ci"]


# ---- paired_difference against oracles ----

def test_one_seed_is_scipys_paired_t_test():
    rng = np.random.default_rng(1)
    a, b = pair(rng, 1, 40, seed_sd=0.0)
    r = stats.paired_difference(a, b, higher_is_better=True)
    ref = scipy_stats.ttest_rel(a[0], b[0])
    assert r["diff"] == pytest.approx((a - b).mean())
    assert r["ci"] == pytest.approx(list(ref.confidence_interval(0.95)), rel=0.01)  # Monte-Carlo pivot
    assert r["p"] == pytest.approx(ref.pvalue, rel=0.03)
    assert (r["n_seeds"], r["n_examples"]) == (1, 40)
    assert "training noise not measured" in r["method"]


def test_seed_only_noise_is_the_t_interval_over_seed_means():
    # d[s, n] = c_s: no example variance, so the interval is Student's t over the S per-seed differences
    c = np.array([0.3, -0.1, 0.5])
    r = stats.paired_difference(np.repeat(c[:, None], 7, axis=1), np.zeros((3, 7)), higher_is_better=True)
    ref = scipy_stats.ttest_1samp(c, 0.0)
    assert r["ci"] == pytest.approx(list(ref.confidence_interval(0.95)), rel=0.03)  # t with 2 df: heavy tail
    assert r["p"] == pytest.approx(ref.pvalue, rel=0.03)


def test_example_only_noise_is_the_t_interval_over_examples():
    # every seed gives the same differences e_n: the interval is the paired t over examples
    e = np.random.default_rng(2).normal(0.2, 1.0, 25)
    r = stats.paired_difference(np.tile(e, (3, 1)), np.zeros((3, 25)), higher_is_better=True)
    ref = scipy_stats.ttest_1samp(e, 0.0)
    assert r["ci"] == pytest.approx(list(ref.confidence_interval(0.95)), rel=0.01)
    assert r["p"] == pytest.approx(ref.pvalue, rel=0.03)


def test_p_value_and_interval_agree_at_every_level():
    rng = np.random.default_rng(3)
    for s in (1, 2, 3):
        for _ in range(20):
            a, b = pair(rng, s, 30, seed_sd=0.3, diff=rng.normal(0, 0.3))
            for level in (0.9, 0.95):
                r = stats.paired_difference(a, b, higher_is_better=True, level=level)
                assert (r["p"] < 1 - level) == (r["ci"][0] > 0 or r["ci"][1] < 0)


def test_constant_and_zero_differences():
    a = np.random.default_rng(4).integers(0, 2, (2, 10)).astype(float)  # 0/1 accuracies: exact sums
    assert stats.paired_difference(a, a, higher_is_better=True)["p"] == 1.0
    shifted = stats.paired_difference(a + 0.25, a, higher_is_better=True)
    assert shifted["p"] == 0.0 and shifted["ci"] == [0.25, 0.25]


def test_deterministic_given_seed():
    a, b = pair(np.random.default_rng(5), 3, 50, seed_sd=0.3)
    r = stats.paired_difference(a, b, higher_is_better=True, seed=7)
    assert stats.paired_difference(a, b, higher_is_better=True, seed=7) == r
    assert stats.paired_difference(a, b, higher_is_better=True, seed=8)["ci"] != r["ci"]


# ---- paired_difference by simulation ----

@pytest.mark.slow
@pytest.mark.parametrize("s,seed_sd", [(1, 0.0), (2, 0.0), (2, 0.1), (2, 0.5), (3, 0.0), (3, 0.1), (3, 0.5),
                                       (5, 0.0), (5, 0.5)])
def test_coverage_of_the_true_difference_is_near_nominal(s, seed_sd):
    # seed_sd 0.5: seed noise dominates (var 2 x 0.25 / S against example noise 1.5 / 200); 0.1: comparable.
    # Two seeds without seed noise are conservative (0.997 over 1,000 draws: two runs cannot show that
    # training noise is absent)
    assert 0.92 <= coverage(ours, s, 200, seed_sd, draws=400) <= (1.0 if (s, seed_sd) == (2, 0.0) else 0.99)


def test_one_seed_cannot_see_training_noise():
    # the documented limit: with one run the interval is about that run, not about training again
    assert coverage(ours, 1, 200, seed_sd=0.5) < 0.6


@pytest.mark.slow
@pytest.mark.parametrize("s,seed_sd", [(1, 0.0), (2, 0.3), (3, 0.3), (3, 0.0)])
def test_identical_variants_are_rarely_separated(s, seed_sd):
    rng = np.random.default_rng(10 + s)
    draws = 800
    rejected = sum(stats.paired_difference(*pair(rng, s, 100, seed_sd, diff=0.0), higher_is_better=True,
                                           resamples=400)["p"] < 0.05 for _ in range(draws))
    assert rejected / draws <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / draws)  # 5% + three Monte-Carlo SEs


def naive_two_level_bootstrap(a, b, resamples=300, seed=0):
    """Resample seeds, then examples (jointly across seeds: they are the same examples)."""
    d = a - b
    s, n = d.shape
    rng = np.random.default_rng(seed)
    seeds = np.stack([np.bincount(rng.integers(0, s, s), minlength=s) for _ in range(resamples)])
    examples = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)])
    means = np.einsum("rs,sn,rn->r", seeds, d, examples) / (s * n)
    return np.quantile(means, [0.025, 0.975])


def mean_squares(a, b):
    d = a - b
    s, n = d.shape
    rows, cols = d.mean(1), d.mean(0)
    resid = ((d - rows[:, None] - cols + d.mean()) ** 2).sum() / ((s - 1) * (n - 1))
    return d.mean(), n * rows.var(ddof=1), s * cols.var(ddof=1), resid, s, n


def satterthwaite(a, b):
    """The variance components pooled into one t quantile with Satterthwaite's degrees of freedom."""
    mean, ms_seed, ms_example, ms_resid, s, n = mean_squares(a, b)
    ms, dfs = [ms_seed, ms_example, ms_resid], [s - 1, n - 1, (s - 1) * (n - 1)]
    total = max(ms_seed + ms_example - ms_resid, ms_resid)
    df = total ** 2 / sum(m ** 2 / f for m, f in zip(ms, dfs))
    half = scipy_stats.t.isf(0.025, df) * np.sqrt(total / (s * n))
    return mean - half, mean + half


def banerjee(a, b):
    """Each variance part with its own t quantile (Banerjee 1960): seed part on S - 1 df, example part on N - 1."""
    mean, ms_seed, ms_example, ms_resid, s, n = mean_squares(a, b)
    half = np.sqrt((scipy_stats.t.isf(0.025, s - 1) ** 2 * max(ms_seed - ms_resid, 0)
                    + scipy_stats.t.isf(0.025, n - 1) ** 2 * ms_example) / (s * n))
    return mean - half, mean + half


@pytest.mark.slow
def test_why_a_pivot_and_not_a_bootstrap_or_a_plug_in_t_with_two_seeds():
    # where training noise dominates, resampling 2 seeds sees half their variance with a normal tail, and
    # a plug-in variance with t quantiles misses whenever the 1-df seed part is small by chance
    assert coverage(naive_two_level_bootstrap, 2, 200, seed_sd=0.5, draws=400) < 0.75
    assert coverage(satterthwaite, 2, 200, seed_sd=0.5, draws=1500) < 0.91
    assert coverage(banerjee, 2, 200, seed_sd=0.5, draws=1500) < 0.935
    assert coverage(ours, 2, 200, seed_sd=0.5, draws=400) >= 0.94


def test_a_constant_shift_is_separated_where_marginal_intervals_overlap():
    rng = np.random.default_rng(5)
    b = rng.normal(0.5, 0.3, (2, 60))  # examples vary a lot in difficulty
    a = b + 0.05 + rng.normal(0, 0.01, b.shape)  # a is better on every example by about 0.05

    def marginal(x):  # bootstrap of one variant's own mean over its examples (the old report's interval)
        means = [x[:, rng.integers(0, 60, 60)].mean() for _ in range(500)]
        return np.quantile(means, [0.025, 0.975])

    (a_lo, a_hi), (b_lo, b_hi) = marginal(a), marginal(b)
    assert a_lo < b_hi  # the marginal intervals overlap
    r = stats.paired_difference(a, b, higher_is_better=True)
    assert r["ci"][0] > 0.04 and r["p"] < 0.01  # two seeds: p cannot be tiny (docs/statistics.md)


# ---- Holm and labels ----

def test_holm_worked_example():
    # sorted 0.005*4 = 0.02 reject, 0.01*3 = 0.03 reject, 0.03*2 = 0.06 stop: 0.04*1 stays unrejected
    r = stats.holm([0.01, 0.04, 0.03, 0.005], level=0.05)
    assert r["adjusted"] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert r["reject"] == [True, False, False, True]


def test_holm_adjusted_values_are_monotone_and_capped():
    p = np.random.default_rng(6).uniform(0, 0.5, 12)
    adjusted = np.array(stats.holm(p)["adjusted"])
    order = np.argsort(p)
    assert (np.diff(adjusted[order]) >= 0).all() and (adjusted <= 1).all() and (adjusted >= p).all()
    assert stats.holm([0.9, 0.8])["adjusted"] == [1.0, 1.0]
    assert stats.holm([]) == {"adjusted": [], "reject": []}


def test_labels_follow_the_metrics_direction():
    up, down = {"diff": 0.2}, {"diff": -0.2}
    assert stats.label(up, higher_is_better=True, reject=True) == "better"
    assert stats.label(up, higher_is_better=False, reject=True) == "worse"  # a higher loss
    assert stats.label(down, higher_is_better=False, reject=True) == "better"
    assert stats.label(up, higher_is_better=True, reject=False) == "not separated"


# ---- compare_to_reference and ranks_with_ties ----

def three_variants(rng, s=3, n=80):
    ref = rng.normal(0, 1, (s, n))
    return {"ref": ref, "good": ref + 0.3 + rng.normal(0, 0.2, (s, n)),
            "bad": ref - 0.3 + rng.normal(0, 0.2, (s, n)), "same": ref + rng.normal(0, 0.2, (s, n))}


def test_compare_to_reference_labels_each_variant_with_holm():
    scores = three_variants(np.random.default_rng(7))
    r = stats.compare_to_reference(scores, "ref", higher_is_better=True)
    assert (r["reference"], r["level"], r["family_size"]) == ("ref", 0.95, 3)
    assert {v: row["label"] for v, row in r["rows"].items()} == {
        "good": "better", "bad": "worse", "same": "not separated"}
    raw = [r["rows"][v]["p"] for v in ("good", "bad", "same")]
    assert [r["rows"][v]["p_holm"] for v in ("good", "bad", "same")] == stats.holm(raw)["adjusted"]
    good = r["rows"]["good"]
    assert good["diff"] == pytest.approx((scores["good"] - scores["ref"]).mean()) and good["ci"][0] > 0
    losses = stats.compare_to_reference(scores, "ref", higher_is_better=False)  # now lower is better
    assert losses["rows"]["good"]["label"] == "worse" and losses["rows"]["bad"]["label"] == "better"


def test_holm_can_leave_a_per_comparison_separation_unlabelled():
    # p about 0.03 alone would be separated at 0.05; among three comparisons Holm needs 0.0167
    rng = np.random.default_rng(8)
    ref = rng.normal(0, 1, (1, 50))
    noise = rng.normal(0, 1, 50)
    noise = (noise - noise.mean()) / noise.std(ddof=1)  # mean 0, sd 1: the diff's t statistic is exact
    t_at_p03 = scipy_stats.t.isf(0.015, 49)
    scores = {"ref": ref, "x": ref + t_at_p03 / np.sqrt(50) + noise,
              "y": ref + noise[::-1], "z": ref - noise}
    row = stats.compare_to_reference(scores, "ref", higher_is_better=True)["rows"]["x"]
    assert row["p"] == pytest.approx(0.03, rel=0.03) and row["ci"][0] > 0
    assert row["p_holm"] > 0.05 and row["label"] == "not separated"


def test_ranks_share_places_where_not_separated():
    rng = np.random.default_rng(9)
    base = rng.normal(0, 1, (2, 200))
    noise = lambda: rng.normal(0, 0.3, base.shape)
    clear = {"a": base + 1.0 + noise(), "b": base + 0.5 + noise(), "c": base + noise()}
    assert stats.ranks_with_ties(clear, higher_is_better=True) == {"a": 1, "b": 2, "c": 3}
    assert stats.ranks_with_ties(clear, higher_is_better=False) == {"a": 3, "b": 2, "c": 1}
    # a chain c < b < a, S = 1 and N = 100: neighbours at t = 2 (p 0.048, not separated after Holm), the
    # ends at t = 2.83 (p 0.006 < 0.05 / 3)
    x = rng.normal(size=(100, 2))
    z = np.linalg.qr(x - x.mean(0))[0] * np.sqrt(99)  # two orthogonal patterns, mean 0, sd 1
    c = rng.normal(0, 1, (1, 100))
    b = c + 0.2 + z[:, 0]
    chain = {"a": b + 0.2 + z[:, 1], "b": b, "c": c}
    assert stats.ranks_with_ties(chain, higher_is_better=True) == {"a": 1, "b": 1, "c": 2}
    tied = {v: base + noise() for v in "abc"}
    assert stats.ranks_with_ties(tied, higher_is_better=True) == {"a": 1, "b": 1, "c": 1}


# ---- Kendall's tau with an interval ----

def rankings(rng, means, s, n, seed_sd):
    """Per-variant (S, N) tables around known means: shared example effects, per-variant seed offsets."""
    v = len(means)
    tables = (np.asarray(means)[:, None, None] + rng.normal(0, seed_sd, (v, s, 1))
              + rng.normal(0, 1, (1, 1, n)) + rng.normal(0, 1, (v, s, n)))
    return {f"v{i}": t for i, t in enumerate(tables)}


def test_vectorised_tau_b_is_metrics_kendall_tau():
    rng = np.random.default_rng(11)
    x, y = rng.integers(0, 4, (50, 6)).astype(float), rng.integers(0, 4, (50, 6)).astype(float)  # with ties
    x[0] = 1.0  # a constant row: nan, as metrics.kendall_tau
    got = stats._tau_b_rows(x, y)
    want = np.array([kendall_tau(a, b) for a, b in zip(x, y)])
    assert np.allclose(got, want, equal_nan=True) and np.isnan(got[0])


MEANS_X = np.arange(6) * 0.1
MEANS_Y = np.array([0, 2, 1, 3, 5, 4]) * 0.1  # true tau 0.733


@pytest.mark.parametrize("s", [2, 3])
def test_tau_interval_covers_the_true_tau(s):
    true = kendall_tau(MEANS_X, MEANS_Y)
    rng = np.random.default_rng(12 + s)
    draws, hits = 200, 0
    for k in range(draws):
        r = stats.kendall_tau_interval(rankings(rng, MEANS_X, s, 300, 0.1), rankings(rng, MEANS_Y, s, 150, 0.1),
                                       higher_x=True, higher_y=True, resamples=400, seed=k)
        hits += r["ci"][0] <= true <= r["ci"][1]
    assert 0.9 <= hits / draws <= 1.0  # tau is discrete: the interval is often exact or conservative


def test_tau_interval_of_nearly_tied_variants_is_wide_and_includes_zero():
    rng = np.random.default_rng(14)
    x, y = rankings(rng, MEANS_X * 0.01, 2, 200, 0.1), rankings(rng, MEANS_Y * 0.01, 2, 200, 0.1)
    r = stats.kendall_tau_interval(x, y, higher_x=True, higher_y=False, resamples=500)
    assert r["ci"][0] < 0 < r["ci"][1] and r["ci"][1] - r["ci"][0] > 1.0


def test_tau_point_estimate_orientation_and_determinism():
    rng = np.random.default_rng(15)
    x, y = rankings(rng, MEANS_X, 2, 100, 0.0), rankings(rng, MEANS_Y, 2, 40, 0.0)
    r = stats.kendall_tau_interval(x, y, higher_x=True, higher_y=True, resamples=300, seed=3)
    means = lambda d: [d[v].mean() for v in d]
    assert r["tau"] == kendall_tau(means(x), means(y))
    flipped = stats.kendall_tau_interval(x, y, higher_x=True, higher_y=False, resamples=300, seed=3)
    assert flipped["tau"] == -r["tau"] and flipped["ci"] == pytest.approx([-r["ci"][1], -r["ci"][0]])
    assert stats.kendall_tau_interval(x, y, higher_x=True, higher_y=True, resamples=300, seed=3) == r


# ---- validation ----

def test_mismatched_or_bad_tables_raise_clear_errors():
    a = np.zeros((2, 10))
    with pytest.raises(ValueError, match=r"shape \(2, 10\).*shape \(3, 10\)"):
        stats.paired_difference(a, np.zeros((3, 10)), higher_is_better=True)
    with pytest.raises(ValueError, match="seeds, examples"):
        stats.paired_difference(np.zeros(10), np.zeros(10), higher_is_better=True)
    with pytest.raises(ValueError, match="NaN"):
        stats.paired_difference(a, np.full((2, 10), np.nan), higher_is_better=True)
    with pytest.raises(ValueError, match="'full' has shape .* 'local' has shape"):
        stats.compare_to_reference({"local": a, "full": np.zeros((2, 9))}, "local", higher_is_better=True)
    with pytest.raises(ValueError, match="reference 'local' is not among"):
        stats.compare_to_reference({"full": a}, "local", higher_is_better=True)
    with pytest.raises(ValueError, match="p-values in"):
        stats.holm([0.5, 1.5])
    with pytest.raises(ValueError, match="same two or more variants"):
        stats.kendall_tau_interval({"a": a, "b": a}, {"a": a, "c": a}, higher_x=True, higher_y=True)
    with pytest.raises(ValueError, match="share seeds"):
        stats.kendall_tau_interval({"a": a, "b": a}, {"a": np.zeros((3, 5)), "b": np.zeros((3, 5))},
                                   higher_x=True, higher_y=True)
    with pytest.raises(ValueError, match=r"same \(seeds, examples\) shape"):
        stats.kendall_tau_interval({"a": a, "b": np.zeros((2, 9))}, {"a": a, "b": a}, higher_x=True, higher_y=True)


def test_rows_interval_is_the_mean_interval_or_none_where_there_is_none_to_give():
    from longctx.stats import mean_interval, rows_interval

    rows = [[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]]
    assert rows_interval(rows) == mean_interval(np.array(rows))
    assert rows_interval([[1.0], [0.0]]) is None  # one example each: no interval over examples
    assert rows_interval([[1.0, 0.0], [1.0]]) is None  # runs on different examples
    assert rows_interval([[1.0, 0.0], None]) is None and rows_interval([]) is None


def test_kendall_tau_of_a_ranking_that_is_all_ties_has_no_interval_and_no_warning():
    import warnings

    flat = {v: np.zeros((2, 5)) for v in "abc"}
    moving = {v: np.full((2, 5), float(i)) + np.arange(5) for i, v in enumerate("abc")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = stats.kendall_tau_interval(flat, moving, higher_x=True, higher_y=True, resamples=50)
    assert np.isnan(t["tau"]) and all(np.isnan(c) for c in t["ci"])
