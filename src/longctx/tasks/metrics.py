"""Downstream metrics: SQuAD v1.1 exact match and F1, RULER's string matches, accuracy, macro-F1, bootstrap
95% intervals and Kendall's tau between rankings.

``normalize_answer``, ``squad_f1`` and ``squad_exact`` are the official SQuAD v1.1 evaluation
script's (``evaluate-v1.1.py``: lower case, drop punctuation, drop the articles a/an/the, collapse
whitespace; F1 over the bag of normalised words; the best score over all gold answers), so numbers
are comparable with published ones. Scores are fractions in [0, 1] here (the script prints x100).

``string_match_all`` and ``string_match_part`` are RULER's (Hsieh et al. 2024; NVIDIA/RULER
``scripts/eval/synthetic/constants.py``, with its ``postprocess_pred`` in ``scripts/eval/evaluate.py``), per
example instead of averaged x100: the share of the gold items that occur in the prediction (case-insensitive
substring), and whether any does.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from longctx.stats import kendall_tau  # noqa: F401  (re-exported: Kendall's tau is one of the metrics)

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (the official v1.1 order)."""
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        return "".join(ch for ch in text if ch not in _PUNCT)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_f1(prediction: str, ground_truth: str) -> float:
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_exact(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def best_over_answers(metric: Callable[[str, str], float], prediction: str, answers: Sequence[str]) -> float:
    """The script's ``metric_max_over_ground_truths``: the best score against any gold answer."""
    return max(metric(prediction, a) for a in answers)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-example (exact match, F1), each the best over that example's gold answers."""
    em = np.array([best_over_answers(squad_exact, p, a) for p, a in zip(predictions, answers)], dtype=float)
    f1 = np.array([best_over_answers(squad_f1, p, a) for p, a in zip(predictions, answers)], dtype=float)
    return em, f1


def ruler_postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: control characters become newlines, the ends are stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """The share of the gold items that occur in the prediction (RULER's niah, vt, cwe and fwe metric)."""
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1 when any gold item occurs in the prediction, else 0 (RULER's qa metric)."""
    p = prediction.lower()
    return float(any(r.lower() in p for r in references))


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean()) if len(gold) else float("nan")


def macro_f1(pred: Sequence[int], gold: Sequence[int], labels: Sequence[int] | None = None) -> float:
    """Unweighted mean over classes of the per-class F1 (a class never predicted nor present counts 0,
    as scikit-learn's ``f1_score(average="macro", labels=...)`` with ``zero_division=0``)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    labels = np.unique(np.concatenate([pred, gold])) if labels is None else np.asarray(labels)
    scores = []
    for c in labels:
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` evaluation examples: the
    examples are resampled with replacement ``resamples`` times (seeded, so reports are reproducible)."""
    if n == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    alpha = (1 - level) / 2
    return [float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))]


def mean_with_ci(values: Sequence[float], resamples: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()) if len(v) else float("nan"), bootstrap_ci(lambda i: v[i].mean(), len(v), resamples, seed)


def t_interval(values: Sequence[float], level: float = 0.95) -> list[float]:
    """Student's t interval of the mean of independent runs (e.g. finetuning seeds): the spread between
    runs, which a bootstrap over one run's evaluation examples does not see. Needs two values or more."""
    from scipy.stats import t  # here: slow to import, only for intervals over seeds

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return [float("nan"), float("nan")]
    half = float(t.ppf(1 - (1 - level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return [float(v.mean()) - half, float(v.mean()) + half]


def ranks(scores: Sequence[float], higher_is_better: bool) -> list[int]:
    """1 = best; equal scores share the better rank."""
    s = np.asarray(scores, dtype=float) * (-1 if higher_is_better else 1)
    return [int((s < v).sum()) + 1 for v in s]
