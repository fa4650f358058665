"""Multiple choice over a long document (QuALITY-style): a question, its options and the document.

Each option is one sequence, ``<cls> question <sep> option <sep> document <sep>`` (the document cut to
fit ``data.seq_len``); the question and the option (with ``<cls>``, up to the second ``<sep>``) are global
(``task.global_tokens: question``). ``LongctxForMultipleChoice`` scores each sequence from its first
token; training minimises the cross-entropy over the options. Judged by accuracy with a bootstrap 95%
interval, beside the chance level (the mean of 1 / options).

Data: ``task.train_file`` / ``dev_file`` / ``test_file`` or ``task.dataset`` with rows ``{id, question,
context, options: [...], label}`` (``label``: the 0-based index of the right option), or a published
schema (``task.schema=quality``, ``scrolls_quality``; ``longctx.tasks.schemas``). Without data: a
built-in task from the default corpus: the context is a stretch of a module's page, the question a key
word that occurs once in it, the options four words of the context, the right one the word after the key
(``builtin.qa_records`` with ``answer_offset=1``).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from longctx.errors import LongctxError
from longctx.tasks import metrics
from longctx.tasks.base import data_seed, register
from longctx.tasks.common import SPLITS, FinetuneTask, PicksALabel, pad_batch


def check_record(row: dict, where: str) -> dict:
    for field in ("question", "context", "options", "label"):
        if row.get(field) is None:
            raise LongctxError(f"{where} has no field '{field}'; multiple-choice rows need question, context, "
                               "options and label (the right option's 0-based index)")
    options = row["options"]
    if isinstance(options, str):
        from longctx.tasks.schemas import parse_answers_string
        options = parse_answers_string(options)
    if not isinstance(options, (list, tuple)) or len(options) < 2:
        raise LongctxError(f"{where}: 'options' must be a list of at least two answers, got {row['options']!r:.80}")
    label = row["label"]
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(options):
        raise LongctxError(f"{where}: 'label' must be the right option's index 0..{len(options) - 1}, got {label!r}")
    return {"id": str(row.get("id") if row.get("id") is not None else where), "question": str(row["question"]),
            "context": str(row["context"]), "options": [str(o) for o in options], "label": label,
            "doc": str(row.get("doc") or row.get("title") or "")}


def builtin_records(docs, context_chars: int, seed: int, per_context: int) -> list[dict]:
    from longctx.tasks.builtin import _WORD, qa_records

    rng = random.Random(seed)
    out = []
    for r in qa_records(docs, context_chars, 0.0, per_context, seed, answer_offset=1):
        gold = r["answers"]["text"][0]
        words = sorted({m.group() for m in _WORD.finditer(r["context"])} - {gold, r["question"]})
        if len(words) < 3:
            continue
        options = rng.sample(words, 3) + [gold]
        rng.shuffle(options)
        out.append({"id": r["id"], "doc": r["doc"], "question": r["question"], "context": r["context"],
                    "options": options, "label": options.index(gold)})
    return out


@register
class MultipleChoiceTask(PicksALabel, FinetuneTask):
    name = "multiple_choice"
    primary_metric = "accuracy"
    default_global = "question"
    OPTIONS = {"max_question_tokens": 64, "max_option_tokens": 64, "context_chars": 3000, "questions_per_context": 2}
    CONFIG = {"data": {"seq_len": 1024}, "model": {"max_position_embeddings": 4096},
              "train": {"steps": 200, "batch_size": 2, "lr": 1e-3, "warmup_steps": 20, "eval_batches": 1}}

    @property
    def model_class(self):
        from longctx.models import LongctxForMultipleChoice
        return LongctxForMultipleChoice

    def load_splits(self):
        from longctx.tasks.files import read_user_splits
        out = read_user_splits(self.opts, "multiple choice", check_record, task=self.name, seed=data_seed(self.cfg))
        if out is not None:
            return out
        from longctx.tasks.builtin import corpus_splits
        self._docs = docs = corpus_splits(data_seed(self.cfg))
        o = self.opts
        return {s: builtin_records(docs[s], o["context_chars"], data_seed(self.cfg) + i, o["questions_per_context"])
                for i, s in enumerate(SPLITS)}

    def tokenizer_texts(self):
        if getattr(self, "_docs", None):
            return [d["text"] for d in self._docs["train"]]
        rows = self.splits["train"]
        return sorted({r["context"] for r in rows}) + [r["question"] for r in rows] + [o for r in rows for o in r["options"]]

    def featurize(self, records, seq_len: int, train: bool) -> list[dict]:
        tok = self.tokenizer
        if tok.sep_id is None or tok.cls_id is None:
            raise LongctxError("multiple choice needs a tokenizer with a <cls> and a <sep> token")
        o = self.opts
        feats = []
        for g in range(0, len(records), 64):
            part = records[g:g + 64]
            qs = tok.encode_batch([" " + r["question"].lstrip() for r in part])
            cs = tok.encode_batch([r["context"] for r in part])
            for j, r in enumerate(part):
                q = list(qs[j][0][:o["max_question_tokens"]])
                opts = tok.encode_batch([" " + x.lstrip() for x in r["options"]])
                seqs, n_global = [], []
                for ids, _ in opts:
                    head = [tok.cls_id, *q, tok.sep_id, *list(ids[:o["max_option_tokens"]]), tok.sep_id]
                    room = seq_len - len(head) - 1
                    if room < 1:
                        raise LongctxError(f"{r['id']}: its question and an option fill data.seq_len={seq_len}; use a "
                                           "longer sequence or smaller task.max_question_tokens / max_option_tokens")
                    seqs.append(np.array(head + list(cs[j][0][:room]) + [tok.sep_id], dtype=np.int32))
                    n_global.append(len(head) - 1)  # up to, not with, the second <sep>
                feats.append({"options": seqs, "n_global": n_global, "label": r["label"]})
        return feats

    def inputs(self, examples) -> dict:
        c = max(len(e["options"]) for e in examples)
        flat, mask = [], torch.zeros((len(examples), c), dtype=torch.bool)
        for i, e in enumerate(examples):
            for k in range(c):
                real = k < len(e["options"])
                mask[i, k] = real
                # a padded option repeats the first (its score is masked to -inf)
                flat.append({"input_ids": e["options"][k if real else 0], "n_global": e["n_global"][k if real else 0]})
        batch = pad_batch(flat, self.tokenizer.pad_id, self.global_tokens)
        out = {k: v.view(len(examples), c, -1) for k, v in batch.items()}
        out["option_mask"] = mask
        return out

    def score(self, split: str, feats, outs) -> dict:
        gold = np.array([f["label"] for f in feats])
        pred = np.array(outs)
        B, seed = self.opts["bootstrap"], data_seed(self.cfg)
        correct = (pred == gold).astype(float)
        return {"accuracy": metrics.accuracy(pred, gold),
                "accuracy_ci": metrics.bootstrap_ci(lambda i: correct[i].mean(), len(gold), B, seed),
                "chance": float(np.mean([1.0 / len(f["options"]) for f in feats])) if feats else float("nan"),
                "examples": len(gold), "per_example": correct.tolist()}
