"""Byte-level document matching (Long Range Arena's "Retrieval", Tay et al. 2020): do two documents
come from the same source? Read byte by byte and trained from scratch, as LRA does.

Input: ``<cls> text1 <sep> text2 <sep>``, each text truncated to half of the sequence; classified from
the first token (global). LRA encodes the two documents separately and classifies the pair of
vectors (a two-tower model, to force a compressed representation); here one encoder reads both, as
the finetuned long-document models of the study do. Data: rows with ``task.text_field`` (default
``text1``), ``task.text_pair_field`` (``text2``) and ``task.label_field`` (``label``). Built-in data:
pairs of stretches of the default corpus, from the same module's page or from two different pages.
"""
from __future__ import annotations

from longctx.data.tokenizer import ByteTokenizer
from longctx.tasks.base import data_seed
from longctx.tasks.base import register
from longctx.tasks.builtin import corpus_splits, pair_records
from longctx.tasks.classification import ClassificationBase
from longctx.tasks.common import SPLITS


@register
class RetrievalTask(ClassificationBase):
    name = "retrieval"
    from_scratch = True
    OPTIONS = {"text_field": "text1", "text_pair_field": "text2", "label_field": "label", "context_chars": 1000,
               "pairs_per_doc": 4}
    CONFIG = {"data": {"seq_len": 2048}, "model": {"max_position_embeddings": 4096},
              "train": {"steps": 200, "batch_size": 4, "lr": 1e-3, "warmup_steps": 20, "eval_batches": 1}}

    def fields(self):
        return (self.opts["text_field"], self.opts["text_pair_field"])

    def make_tokenizer(self):
        return ByteTokenizer()

    def builtin_splits(self):
        docs = corpus_splits(data_seed(self.cfg))
        return {s: [{"texts": [r["text1"], r["text2"]], "label": r["label"]}
                    for r in pair_records(docs[s], self.opts["context_chars"], data_seed(self.cfg) + i,
                                          self.opts["pairs_per_doc"])]
                for i, s in enumerate(SPLITS)}
