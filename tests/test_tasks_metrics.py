"""Metrics against hand-computed values: SQuAD v1.1 EM/F1 (the official script's normalisation),
accuracy, macro-F1, bootstrap intervals and Kendall's tau (checked against scipy)."""
import math

import numpy as np
import pytest

from longctx.tasks import metrics


def test_normalize_answer_follows_the_official_script():
    # lower, punctuation removed, articles a/an/the removed (whole words only), whitespace collapsed
    assert metrics.normalize_answer("The  Cat, sat!") == "cat sat"
    assert metrics.normalize_answer("An apple a day") == "apple day"
    assert metrics.normalize_answer("theory of thermals") == "theory of thermals"  # 'the' inside words stays
    assert metrics.normalize_answer("  x\t\ny ") == "x y"
    # punctuation goes first, so "the-end" -> "theend" (not an article) as in the script
    assert metrics.normalize_answer("the-end") == "theend"


def test_exact_match_and_f1_on_hand_made_cases():
    assert metrics.squad_exact("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert metrics.squad_exact("Eiffel", "Eiffel Tower") == 0.0
    # pred {eiffel}, gold {eiffel, tower}: P = 1, R = 1/2 -> F1 = 2/3
    assert metrics.squad_f1("Eiffel", "the Eiffel Tower") == pytest.approx(2 / 3)
    # pred {in, paris, france}, gold {paris}: P = 1/3, R = 1 -> F1 = 1/2
    assert metrics.squad_f1("in Paris, France", "Paris") == pytest.approx(0.5)
    # repeated words count with multiplicity: pred {a,a} gold {a}: common 1, P 1/2, R 1 -> 2/3 ('a' is an
    # article and is removed, so use another word)
    assert metrics.squad_f1("go go", "go") == pytest.approx(2 / 3)
    assert metrics.squad_f1("nothing", "else") == 0.0
    # only articles and punctuation: both normalise to "" -> EM 1, F1 0 (no common token), as the script
    assert metrics.squad_exact("the", "a.") == 1.0
    assert metrics.squad_f1("the", "a.") == 0.0


def test_best_over_several_gold_answers():
    em, f1 = metrics.squad_scores(["Denver Broncos", "Carolina"],
                                  [["Broncos", "Denver Broncos"], ["Carolina Panthers", "the Panthers"]])
    assert em.tolist() == [1.0, 0.0]
    assert f1.tolist() == pytest.approx([1.0, 2 / 3])


def test_accuracy_and_macro_f1():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    assert metrics.accuracy(pred, gold) == pytest.approx(4 / 6)
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 1/2; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert metrics.macro_f1(pred, gold) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a class in the label set that is never predicted nor present counts 0
    assert metrics.macro_f1(pred, gold, labels=[0, 1, 2, 3]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = rng.random(50) < 0.3
    big = rng.random(2000) < 0.3
    m, ci = metrics.mean_with_ci(small, seed=1)
    assert ci[0] <= m <= ci[1]
    _, ci_big = metrics.mean_with_ci(big, seed=1)
    assert ci_big[1] - ci_big[0] < ci[1] - ci[0]
    # binomial standard error: the 95% interval is about +-1.96 sqrt(p(1-p)/n)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 2000)
    assert (ci_big[1] - ci_big[0]) / 2 == pytest.approx(half, rel=0.15)
    # seeded: the same interval twice
    assert metrics.mean_with_ci(small, seed=1)[1] == ci
    # a constant sample has a zero-width interval
    assert metrics.mean_with_ci(np.ones(10))[1] == [1.0, 1.0]


def test_kendall_tau_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(3, 9))
        x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, n).astype(float)
        want = stats.kendalltau(x, y).statistic  # tau-b
        got = metrics.kendall_tau(x, y)
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want)
    assert metrics.kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert metrics.kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0


def test_ranks():
    assert metrics.ranks([0.5, 0.9, 0.5], higher_is_better=True) == [2, 1, 2]
    assert metrics.ranks([3.0, 1.0, 2.0], higher_is_better=False) == [3, 1, 2]


def test_t_interval_is_students_over_runs():
    from scipy import stats
    # by hand: mean 1, sd 1, three runs: 1 +- t(0.975, 2) / sqrt(3) = 1 +- 4.3027 / 1.7321
    assert metrics.t_interval([0.0, 1.0, 2.0]) == pytest.approx([1 - 2.48414, 1 + 2.48414], abs=1e-4)
    v = [0.45, 0.48, 0.44, 0.47]
    ref = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert metrics.t_interval(v) == pytest.approx(list(ref))
    assert all(x != x for x in metrics.t_interval([0.5]))  # one run has no spread to measure
