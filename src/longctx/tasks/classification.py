"""Long-document classification: ``<cls> text <sep>`` (truncated to the sequence), classified from the
first token, which is global (Longformer's preset, ``task.global_tokens: first``). Judged by accuracy
and macro-F1, each with a bootstrap 95% interval.

Data: ``task.train_file`` / ``dev_file`` / ``test_file`` (JSONL, JSON, CSV or Parquet) with a text
column (``task.text_field``) and a label column (``task.label_field``; strings or integers). The label
set comes from the training split; a dev or test label the training split lacks is an error. Without
files: the built-in section task from the default corpus (``longctx.tasks.builtin.section_records``).

``PairClassificationTask`` is the same with two texts, ``<cls> text1 <sep> text2 <sep>`` (document
matching).
"""
from __future__ import annotations

import numpy as np

from longctx.errors import LongctxError
from longctx.models import LongctxForSequenceClassification
from longctx.tasks import metrics
from longctx.tasks.base import data_seed
from longctx.tasks.base import register
from longctx.tasks.builtin import corpus_splits, section_records
from longctx.tasks.common import SPLITS, FinetuneTask, PicksALabel
from longctx.tasks.files import read_user_splits


class ClassificationBase(PicksALabel, FinetuneTask):
    primary_metric = "accuracy"
    default_global = "first"
    text_fields: tuple[str, ...] = ("text",)
    OPTIONS = {"text_field": "text", "label_field": "label", "context_chars": 3000}

    @property
    def model_class(self):
        return LongctxForSequenceClassification

    def fields(self) -> tuple[str, ...]:
        return (self.opts["text_field"],)

    def load_splits(self):
        self._first_label = None  # (label, where): every later label must be of its kind
        out = read_user_splits(self.opts, self.name, self._check, task=self.name, seed=data_seed(self.cfg))
        if out is None:
            out = self.builtin_splits()
        self._label_set(out)
        return out

    def _check(self, row: dict, where: str) -> dict:
        for field in (*self.fields(), self.opts["label_field"]):
            if field not in row:
                raise LongctxError(f"{where} has no field '{field}' (fields: {', '.join(map(str, row))}); choose "
                                   "the columns with task.text_field / task.label_field")
            if row[field] is None or row[field] != row[field]:  # null, or NaN (Parquet's and CSV's missing value)
                raise LongctxError(f"{where} has no value in '{field}' (missing, null or NaN); fill it in or "
                                   "drop the row")
        return {"texts": [str(row[f]) for f in self.fields()], "label": self._label(row[self.opts["label_field"]], where)}

    def _label(self, label, where: str):
        """A label as a class name: a string or an integer (an integral float, as a column with missing
        values stores integers, taken as the integer), one kind in every split: the integer 0 and the
        string '0' would be two classes."""
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if not isinstance(label, (str, int)):
            raise LongctxError(f"{where} has the label {label!r}; labels must be strings or integers")
        if self._first_label is None:
            self._first_label = (label, where)
        first, first_where = self._first_label
        if isinstance(label, str) != isinstance(first, str):
            raise LongctxError(f"{where} has the label {label!r} but {first_where} has {first!r}; give every "
                               "label as a string or every label as an integer")
        return label

    def builtin_splits(self) -> dict[str, list[dict]]:
        raise NotImplementedError

    def _label_set(self, splits) -> None:
        train = {r["label"] for r in splits["train"]}
        for s in ("dev", "test"):
            extra = {r["label"] for r in splits[s]} - train
            if extra:
                raise LongctxError(f"the {s} split has label(s) {sorted(extra)} that the training split "
                                   f"lacks (train labels: {sorted(train)}); the label sets must agree")
        self.labels = sorted(train, key=lambda x: (str(type(x)), x))
        self.label_id = {label: i for i, label in enumerate(self.labels)}

    def tokenizer_texts(self):
        if getattr(self, "_docs", None):
            return [d["text"] for d in self._docs["train"]]
        return [t for r in self.splits["train"] for t in r["texts"]]

    def head_config(self) -> dict:
        return {"num_labels": len(self.labels), "id2label": {i: str(label) for i, label in enumerate(self.labels)},
                "label2id": {str(label): i for i, label in enumerate(self.labels)}}

    def featurize(self, records, seq_len: int, train: bool) -> list[dict]:
        tok = self.tokenizer
        if tok.sep_id is None or tok.cls_id is None:
            raise LongctxError(f"task {self.name!r} needs a tokenizer with a <cls> and a <sep> token")
        k = len(self.fields())
        room = seq_len - 1 - k  # <cls> and one <sep> after each text
        per = [room // k + (i < room % k) for i in range(k)]  # each text its share of the sequence
        encoded = [tok.encode_batch([r["texts"][i] for r in records]) if records else [] for i in range(k)]
        feats = []
        for j, r in enumerate(records):
            ids = [tok.cls_id]
            for i in range(k):
                ids += list(encoded[i][j][0][:per[i]]) + [tok.sep_id]
            feats.append({"input_ids": ids, "n_global": 1, "label": self.label_id[r["label"]]})
        return feats

    def score(self, split: str, feats, outs) -> dict:
        gold = np.array([f["label"] for f in feats])
        pred = np.array(outs)
        B, seed = self.opts["bootstrap"], data_seed(self.cfg)
        labels = list(range(len(self.labels)))
        majority = float(np.bincount(gold, minlength=len(labels)).max() / max(1, len(gold)))
        return {"accuracy": metrics.accuracy(pred, gold),
                "accuracy_ci": metrics.bootstrap_ci(lambda i: metrics.accuracy(pred[i], gold[i]), len(gold), B, seed),
                "macro_f1": metrics.macro_f1(pred, gold, labels),
                "macro_f1_ci": metrics.bootstrap_ci(lambda i: metrics.macro_f1(pred[i], gold[i], labels), len(gold), B, seed),
                "majority_baseline": majority, "examples": len(gold), "per_example": (pred == gold).astype(float).tolist()}


@register
class ClassificationTask(ClassificationBase):
    name = "classification"
    CONFIG = {"data": {"seq_len": 1024}, "model": {"max_position_embeddings": 4096},
              "train": {"steps": 200, "batch_size": 4, "lr": 1e-3, "warmup_steps": 20, "eval_batches": 1}}

    def builtin_splits(self):
        self._docs = corpus_splits(data_seed(self.cfg))
        return {s: [{"texts": [r["text"]], "label": r["label"]}
                    for r in section_records(self._docs[s], self.opts["context_chars"], data_seed(self.cfg) + i)]
                for i, s in enumerate(SPLITS)}
