"""Section heading (StructFormer's kind of document understanding): given a sentence from the body of a
document, extract the heading of the section it belongs to.

Built from a structure-aware corpus (``structured.jsonl`` of ``longctx corpus arxiv``, or ``texdoc``,
the installed LaTeX documentation), split into train / dev / test by document. Each example is
extractive QA (``tasks/qa.py``: same features, decoding, SQuAD EM/F1 with bootstrap intervals):

- question: one sentence of a section's body, at least ``task.min_gap`` characters after its heading
  and unique in the context;
- context: a stretch of ``task.context_chars`` characters of the document holding the heading and the
  sentence, usually other headings too (the start is drawn at random before the heading);
- answer: the heading's text, as it stands in the context.

The answer is far from the evidence: the model must find the sentence in the context, then walk back
to the last heading before it (the distance, in tokens from the question to the answer, is in the
results as ``evidence_distance``; the heading is before the sentence, so a model that copies the
nearest heading to the matched sentence has to look backwards across the section).

Global tokens: the question (Longformer's QA preset), plus the context's heading tokens when the model
was pretrained with headings global (``task.heading_global: auto``, read from the pretraining run's
``data.global_tokens``; ``true`` / ``false`` force it): StructFormer's model keeps its global headings.
"""
from __future__ import annotations

import random
import re

from longctx.data.corpus import load_documents
from longctx.errors import LongctxError
from longctx.models.loading import run_settings
from longctx.tasks.base import data_seed
from longctx.tasks.base import register
from longctx.tasks.common import SPLITS, split_by_document
from longctx.tasks.qa import QATask

ANSWER_KINDS = ("section", "subsection", "subsubsection")
GLOBAL_KINDS = ("title", "section", "subsection", "subsubsection")  # the heading tokens made global
_SENTENCE = re.compile(r"(?<![^\s])[A-Z][a-z][^.!?\n]{30,240}[.!?]")  # starts a word, ends the sentence


def _spans(doc: dict, kinds) -> list[tuple[int, int]]:
    return sorted((int(s["start"]), int(s["end"])) for s in doc.get("structure", []) if s["kind"] in kinds
                  and int(s["end"]) > int(s["start"]))


def heading_records(docs: list[dict], context_chars: int, seed: int, per_section: int = 2,
                    min_gap: int = 200) -> list[dict]:
    """SQuAD-style rows ``{id, doc, question, context, answers, headings}``; ``headings`` are the
    character spans of every heading inside the context (for the global mask)."""
    rng = random.Random(seed)
    out = []
    for doc in docs:
        text = doc["text"]
        heads = _spans(doc, ANSWER_KINDS)
        every = _spans(doc, GLOBAL_KINDS)
        for k, (hs, he) in enumerate(heads):
            answer = text[hs:he].strip()
            if not answer or len(answer) > 120:
                continue
            body_end = heads[k + 1][0] if k + 1 < len(heads) else len(text)
            cands = [m for m in _SENTENCE.finditer(text, he + min_gap, body_end)
                     if m.end() - hs <= context_chars]
            for j, m in enumerate(rng.sample(cands, min(per_section, len(cands)))):
                # the context starts somewhere before the heading (at a line start), ends after the sentence
                lo = max(0, m.end() - context_chars)
                a = rng.randint(lo, hs)
                a = max(lo, text.rfind("\n", lo, a) + 1) if a > lo else a
                b = min(len(text), a + context_chars)
                context, question = text[a:b], m.group()
                if context.count(question) != 1:
                    continue
                start = hs - a + (len(text[hs:he]) - len(text[hs:he].lstrip()))
                if context[start:start + len(answer)] != answer:
                    continue
                out.append({"id": f"{doc['id']}:{k}:{j}", "doc": doc["id"], "question": question,
                            "context": context, "answers": {"text": [answer], "answer_start": [start]},
                            "headings": [(max(0, x - a), min(b, y) - a) for x, y in every if y > a and x < b]})
    return out


@register
class SectionHeadingTask(QATask):
    name = "section_heading"
    primary_metric = "f1"
    default_global = "question"
    OPTION_TYPES = {"heading_global": (str, bool)}  # "auto", true or false
    OPTIONS = {"max_answer_length": 24, "doc_stride": 128, "max_question_tokens": 64, "max_chunks": 512,
               "corpus": None, "context_chars": 1600, "per_section": 2, "min_gap": 200, "heading_global": "auto"}
    CONFIG = {"data": {"seq_len": 512}, "model": {"max_position_embeddings": 4096},
              "train": {"steps": 200, "batch_size": 8, "lr": 1e-3, "warmup_steps": 20, "eval_batches": 1}}

    # ---- data ----
    def corpus(self) -> str:
        """The task's corpus: ``task.corpus``, else the pretraining corpus of ``init_from`` (when it has
        structure), else ``data.corpus`` unless it is the plain default, else ``texdoc``."""
        if self.opts["corpus"]:
            return str(self.opts["corpus"])
        run = self._pretraining_run()
        pre = (run.get("data") or {}).get("corpus")
        if pre and pre != "default":
            return str(pre)
        given = self.cfg["data"].get("corpus")
        return str(given) if given and given != "default" else "texdoc"

    def _pretraining_run(self) -> dict:
        init = self.cfg.get("init_from")
        return run_settings(init) if init else {}

    def headings_global(self) -> bool:
        hg = self.opts["heading_global"]
        if hg == "auto":
            return (self._pretraining_run().get("data") or {}).get("global_tokens") == "headings"
        if not isinstance(hg, bool):
            raise LongctxError(f"task.heading_global must be auto, true or false, got {hg!r}")
        return hg

    def load_splits(self):
        o = self.opts
        if any(o[f"{s}_file"] for s in SPLITS):
            return super().load_splits()
        docs = [d for d in load_documents(self.corpus()) if d.get("structure")]
        if not docs:
            raise LongctxError(f"task section_heading needs a corpus with structure spans (structured.jsonl of "
                               f"longctx corpus arxiv, or texdoc); {self.corpus()} has none")
        self._docs = split_by_document(docs, lambda d: d["id"], data_seed(self.cfg))
        return {s: heading_records(self._docs[s], o["context_chars"], data_seed(self.cfg) + i, o["per_section"],
                                   o["min_gap"]) for i, s in enumerate(SPLITS)}

    # ---- features: QA's, plus where the context's headings are ----
    def featurize(self, records, seq_len: int, train: bool) -> list[dict]:
        feats = super().featurize(records, seq_len, train)
        for f in feats:
            spans = records[f["record"]].get("headings") or []
            f["heading_positions"] = [f["ctx_start"] + i for i, (s, e) in enumerate(f["offsets"])
                                      if e > s and any(s < y and e > x for x, y in spans)]
        return feats

    def inputs(self, examples) -> dict:
        batch = super().inputs(examples)
        if self.global_tokens != "none" and self.headings_global():
            for row, e in enumerate(examples):
                batch["global_attention_mask"][row, e.get("heading_positions", [])] = True
        return batch

    def score(self, split: str, feats, outs) -> dict:
        out = super().score(split, feats, outs)
        out["heading_global"] = self.headings_global()
        return out
