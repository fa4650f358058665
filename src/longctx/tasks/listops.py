"""ListOps (Nangia & Bowman 2018, at Long Range Arena's lengths, Tay et al. 2020): evaluate a nested
expression of MAX, MIN, MED (median) and SM (sum modulo 10) over digits, e.g.
``[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]`` -> 5; ten classes, trained from scratch.

The generator follows LRA's ``listops.py`` rules: a node at depth < ``max_depth`` is an operator with
probability 0.25 (else a digit 0-9; at ``max_depth`` always a digit), an operator takes 2 to
``max_args`` arguments, MED is ``int(numpy.median(...))``, SM the sum modulo 10; an expression is kept
when its length (digits, operators and closing brackets) lies strictly between ``min_length`` and
``max_length`` (LRA: depth 10, 10 arguments, lengths 500-2,000). Expressions are drawn with a seeded
generator per split, distinct within a split. Tokens: one per symbol, a small fixed vocabulary;
classified from the first token (``<cls>``, global).
"""
from __future__ import annotations

import random

import numpy as np

from longctx.errors import LongctxError
from longctx.models import LongctxForSequenceClassification
from longctx.tasks import metrics
from longctx.tasks.base import data_seed
from longctx.tasks.base import register
from longctx.tasks.common import SPLITS, FinetuneTask, PicksALabel

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25  # probability that a node (above the depth limit) is an operator


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
    """(tree, length): a digit, or (operator, [children]); length counts digits, operators and ']'."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return rng.choice(range(10)), 1
    length, children = 2, []
    for _ in range(rng.randint(2, max_args)):
        child, n = generate_tree(rng, depth + 1, max_depth, max_args)
        children.append(child)
        length += n
    return (rng.choice(OPERATORS), children), length  # the operator drawn after the children, as LRA


def evaluate_tree(t) -> int:
    if isinstance(t, int):
        return t
    op, children = t
    values = [evaluate_tree(c) for c in children]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(np.median(values))
    return sum(values) % 10


def to_tokens(t) -> list[str]:
    if isinstance(t, int):
        return [str(t)]
    op, children = t
    return [op] + [tok for c in children for tok in to_tokens(c)] + [END]


def generate(n: int, seed: int, max_depth: int, max_args: int, min_length: int, max_length: int,
             exclude: set | None = None) -> list[dict]:
    """``n`` distinct expressions within the length limits: ``{"tokens", "label"}``."""
    rng = random.Random(seed)
    seen, out, tries = set(exclude or ()), [], 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise LongctxError(f"ListOps: could not draw {n} distinct expressions with lengths in ({min_length}, "
                               f"{max_length}) at depth {max_depth}; widen the limits")
        tree, length = generate_tree(rng, 1, max_depth, max_args)
        if not min_length < length < max_length:
            continue
        tokens = to_tokens(tree)
        key = " ".join(tokens)
        if key in seen:
            continue
        seen.add(key)
        out.append({"tokens": tokens, "label": evaluate_tree(tree)})
    return out


class ListOpsTokenizer:
    """One id per ListOps symbol; the interface of ``longctx.data.tokenizer`` that tasks use."""

    symbols = ("<pad>", "<cls>", "<sep>", "<mask>", *[str(d) for d in range(10)], *OPERATORS, END)
    pad_id, cls_id, sep_id, mask_id = 0, 1, 2, 3
    bos_id, eos_id, unk_id = 1, 2, None
    special_ids = frozenset({0, 1, 2, 3})
    vocab_size = len(symbols)
    ids = {s: i for i, s in enumerate(symbols)}

    def encode_tokens(self, tokens: list[str]) -> list[int]:
        return [self.ids[t] for t in tokens]


@register
class ListOpsTask(PicksALabel, FinetuneTask):
    name = "listops"
    primary_metric = "accuracy"
    default_global = "first"
    from_scratch = True
    OPTIONS = {"train_size": 2000, "dev_size": 200, "test_size": 200, "max_depth": 10, "max_args": 10,
               "min_length": 500, "max_length": 2000}
    CONFIG = {"data": {"seq_len": 2048}, "model": {"max_position_embeddings": 4096},
              "train": {"steps": 200, "batch_size": 4, "lr": 1e-3, "warmup_steps": 20, "eval_batches": 1}}

    @property
    def model_class(self):
        return LongctxForSequenceClassification

    def load_splits(self):
        o = self.opts
        if any(o[f"{s}_file"] for s in SPLITS):
            raise LongctxError("ListOps generates its data; it takes no task.*_file (use task.train_size, "
                               "task.max_depth, task.min_length, task.max_length)")
        seen: set = set()
        out = {}
        for i, s in enumerate(SPLITS):  # distinct across splits too: no test expression was trained on
            out[s] = generate(o[f"{s}_size"], data_seed(self.cfg) * 1000 + i, o["max_depth"], o["max_args"],
                              o["min_length"], o["max_length"], exclude=seen)
            seen |= {" ".join(r["tokens"]) for r in out[s]}
        return out

    def make_tokenizer(self):
        return ListOpsTokenizer()

    def head_config(self) -> dict:
        return {"num_labels": 10}

    def featurize(self, records, seq_len: int, train: bool) -> list[dict]:
        tok = self.tokenizer
        if self.opts["max_length"] > seq_len:  # up to max_length - 1 symbols, plus <cls>
            raise LongctxError(f"ListOps expressions of up to {self.opts['max_length'] - 1} symbols do not fit "
                               f"data.seq_len={seq_len}; use data.seq_len >= {self.opts['max_length']}")
        return [{"input_ids": [tok.cls_id, *tok.encode_tokens(r["tokens"])], "n_global": 1, "label": r["label"]}
                for r in records]

    def score(self, split, feats, outs) -> dict:
        gold, pred = np.array([f["label"] for f in feats]), np.array(outs)
        B, seed = self.opts["bootstrap"], data_seed(self.cfg)
        return {"accuracy": metrics.accuracy(pred, gold),
                "accuracy_ci": metrics.bootstrap_ci(lambda i: metrics.accuracy(pred[i], gold[i]), len(gold), B, seed),
                "majority_baseline": float(np.bincount(gold, minlength=10).max() / max(1, len(gold))),
                "examples": len(gold), "per_example": (pred == gold).astype(float).tolist()}
