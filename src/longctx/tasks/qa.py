"""Extractive question answering over long documents (SQuAD format; TriviaQA / HotpotQA converted to it).

Input: ``<cls> question <sep> context <sep>``; the question tokens (with ``<cls>``, without the
``<sep>``) are global (Longformer's QA preset, ``task.global_tokens: question``), as the model's own
``question_global_mask`` makes them for every call. A context longer than the sequence is cut into
overlapping chunks (``task.doc_stride`` tokens of overlap; a context that needs more than
``task.max_chunks`` is refused); training keeps the chunks that hold the answer, evaluation scores
every span of every chunk and keeps the best: start logit + end logit,
start <= end < start + ``task.max_answer_length`` tokens, inside the context. Judged by the official
SQuAD v1.1 exact match and F1 (best over the gold answers), each with a bootstrap 95% interval.

Data: ``task.train_file`` / ``dev_file`` / ``test_file`` with rows ``{id, question, context, answers:
{text: [...], answer_start: [...]}}`` (or answers as a list of ``{text, answer_start}``, or the
official nested SQuAD JSON). Without files: the built-in long-document QA task from the default
corpus (``longctx.tasks.builtin.qa_records``).
"""
from __future__ import annotations

import numpy as np
import torch

from longctx.errors import LongctxError
from longctx.models import LongctxForQuestionAnswering, question_global_mask
from longctx.tasks import metrics
from longctx.tasks.base import data_seed
from longctx.tasks.base import register
from longctx.tasks.builtin import corpus_splits, qa_records
from longctx.tasks.common import SPLITS, FinetuneTask, pad_batch
from longctx.tasks.files import read_user_splits


def _answers(row: dict, where: str) -> tuple[list[str], list[int]]:
    ans = row["answers"]
    if isinstance(ans, str):  # a CSV's column: JSON, or what datasets' to_csv writes
        from longctx.tasks.schemas import parse_answers_string
        ans = parse_answers_string(ans)
    if isinstance(ans, dict) and "text" in ans and "answer_start" in ans:
        texts, starts = list(ans["text"]), list(ans["answer_start"])
    elif isinstance(ans, list) and all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in ans):
        texts, starts = [a["text"] for a in ans], [a["answer_start"] for a in ans]
    else:
        raise LongctxError(f"{where}: 'answers' must be {{text: [...], answer_start: [...]}} or a list of "
                           f"{{text, answer_start}}, got {row['answers']!r:.80}")
    if not texts or len(texts) != len(starts):
        raise LongctxError(f"{where}: 'answers' needs at least one answer and as many answer_start as text")
    return [str(t) for t in texts], [int(s) for s in starts]


def check_record(row: dict, where: str) -> dict:
    """One QA row, checked: fields present, every answer_start pointing at its answer text."""
    for field in ("question", "context", "answers"):
        if row.get(field) is None:
            raise LongctxError(f"{where} has no field '{field}'; QA rows need question, context and answers "
                               "{text, answer_start}")
    texts, starts = _answers(row, where)
    context = str(row["context"])
    for t, s in zip(texts, starts):
        if context[s:s + len(t)] != t:
            raise LongctxError(f"{where}: answer_start {s} does not point at the answer {t!r} (the context there "
                               f"reads {context[s:s + len(t)]!r}); fix answer_start or the answer text")
    return {"id": str(row.get("id") if row.get("id") is not None else where), "question": str(row["question"]),
            "context": context, "answers": {"text": texts, "answer_start": starts}}


@register
class QATask(FinetuneTask):
    name = "qa"
    primary_metric = "f1"
    default_global = "question"
    OPTIONS = {"max_answer_length": 30, "doc_stride": 128, "max_question_tokens": 64, "max_chunks": 512,
               # the built-in task (no files)
               "context_chars": 6000, "far_fraction": 0.5, "questions_per_context": 2, "answer_offset": 0}
    CONFIG = {"data": {"seq_len": 1024}, "model": {"max_position_embeddings": 4096},
              "train": {"steps": 200, "batch_size": 4, "lr": 1e-3, "warmup_steps": 20, "eval_batches": 1}}

    @property
    def model_class(self):
        return LongctxForQuestionAnswering

    def load_splits(self):
        out = read_user_splits(self.opts, "QA", check_record, task="qa", seed=data_seed(self.cfg))
        if out is not None:
            return out
        o, docs = self.opts, corpus_splits(data_seed(self.cfg))
        self._docs = docs
        return {s: qa_records(docs[s], o["context_chars"], o["far_fraction"], o["questions_per_context"],
                              data_seed(self.cfg) + i, answer_offset=o["answer_offset"]) for i, s in enumerate(SPLITS)}

    def tokenizer_texts(self):
        if getattr(self, "_docs", None):
            return [d["text"] for d in self._docs["train"]]
        return sorted({r["context"] for r in self.splits["train"]}) + [r["question"] for r in self.splits["train"]]

    # ---- features ----
    def featurize(self, records, seq_len: int, train: bool) -> list[dict]:
        tok = self.tokenizer
        if tok.sep_id is None or tok.cls_id is None:
            raise LongctxError("QA needs a tokenizer with a <cls> and a <sep> token")
        o = self.opts
        self.check_chunking(self.opts, seq_len)
        feats = []
        for ri, r, (q, _), (c, offs) in self._encoded(records):
            q = q[:o["max_question_tokens"]]
            head = [tok.cls_id, *q, tok.sep_id]
            room = seq_len - len(head) - 1
            stride = room - o["doc_stride"]
            chunks = 1 + max(0, -(-(len(c) - room) // stride))
            if chunks > o["max_chunks"]:
                raise LongctxError(f"{r['id']}: its context of {len(c)} tokens makes {chunks} chunks of "
                                   f"data.seq_len={seq_len}, more than task.max_chunks={o['max_chunks']}; raise "
                                   "task.max_chunks, use a longer sequence or shorten the context")
            a_char = r["answers"]["answer_start"][0]
            b_char = a_char + len(r["answers"]["text"][0])
            # the answer's first and last context tokens (offsets may include a leading space)
            a_tok = next((i for i, (s, e) in enumerate(offs) if e > a_char), None)
            b_tok = next((i for i in range(len(offs) - 1, -1, -1) if offs[i][0] < b_char), None)
            for cs in range(0, max(1, len(c)), stride):
                ce = min(len(c), cs + room)
                has = a_tok is not None and b_tok is not None and cs <= a_tok and b_tok < ce
                if train and not has:
                    if ce >= len(c):
                        break
                    continue
                # int32 arrays, not lists of Python ints and tuples: ~12 bytes a token instead of ~115, for
                # evaluation holds every chunk of every context of a split
                f = {"input_ids": np.array(head + c[cs:ce] + [tok.sep_id], dtype=np.int32), "record": ri,
                     "ctx_start": len(head), "chunk": cs,
                     "offsets": np.array(offs[cs:ce], dtype=np.int32).reshape(-1, 2)}
                if train:
                    f["start"], f["end"] = a_tok - cs + len(head), b_tok - cs + len(head)
                elif has:
                    f["distance"] = a_tok - cs  # tokens from the question's end to the answer
                feats.append(f)
                if ce >= len(c):
                    break
        return feats

    def inputs(self, examples) -> dict:
        """Padded inputs whose global tokens are the QA model's own (``question_global_mask``): training,
        evaluation, a plain ``model(...)`` call and the exported graph all make the same tokens global."""

        batch = pad_batch(examples, self.tokenizer.pad_id, "none")
        if self.global_tokens != "none":
            batch["global_attention_mask"] = question_global_mask(batch["input_ids"], self.tokenizer.sep_id)
        return batch

    def _encoded(self, records, group: int = 64):
        """(index, record, question tokens, (context tokens, offsets)), encoded a group at a time: the
        tokens and offsets of every context at once would hold the whole split's text several times over."""
        tok = self.tokenizer
        for g in range(0, len(records), group):
            part = records[g:g + group]
            # the question after a space: a byte-level BPE then spells its first word as inside a sentence
            # of the context (" word", not "word"), so the model can match the two by token identity
            questions = tok.encode_batch([" " + r["question"].lstrip() for r in part])
            contexts = tok.encode_batch([r["context"] for r in part])
            yield from zip(range(g, g + len(part)), part, questions, contexts)

    @classmethod
    def check_chunking(cls, o: dict, seq_len: int) -> None:
        """Chunks must advance: the context room beside the longest question must exceed the overlap
        (``o``: the task's options; a comparison calls it on its finetune section before pretraining)."""
        if o["doc_stride"] < 0 or o["max_question_tokens"] < 1 or o["max_chunks"] < 1:
            raise LongctxError("task.doc_stride must be at least 0, task.max_question_tokens and task.max_chunks "
                               "at least 1")
        room = seq_len - o["max_question_tokens"] - 3  # <cls> question <sep> context <sep>
        if room - o["doc_stride"] < 1:
            raise LongctxError(f"data.seq_len={seq_len} leaves {max(room, 0)} context tokens beside a question of "
                               f"task.max_question_tokens={o['max_question_tokens']}, not more than the overlap "
                               f"task.doc_stride={o['doc_stride']}; use a longer sequence or a smaller doc_stride "
                               "or max_question_tokens")

    def label_tensors(self, examples) -> dict:
        return {"start_positions": torch.tensor([e["start"] for e in examples]),
                "end_positions": torch.tensor([e["end"] for e in examples])}

    def unbatch(self, output, batch) -> list:
        return list(zip(output.start_logits.float().cpu(), output.end_logits.float().cpu()))

    # ---- decoding and metrics ----
    def best_span(self, start_logits, end_logits, f) -> tuple[float, int, int]:
        """(score, first, last) of the best span inside the feature's context, in context-token indices."""
        a, n = f["ctx_start"], len(f["offsets"])
        s, e = start_logits[a:a + n], end_logits[a:a + n]
        L = min(self.opts["max_answer_length"], n)
        # scores[i, l] = s[i] + e[i + l]: every span of up to L tokens starting at i
        e_pad = torch.cat([e, torch.full((L,), float("-inf"))])
        scores = s[:, None] + e_pad.unfold(0, L, 1)[:n]  # (n, L)
        k = int(scores.argmax())
        i, length = divmod(k, L)
        return float(scores.view(-1)[k]), i, i + length

    def predictions(self, split: str, feats, outs) -> list[str]:
        records = self.eval_records(split)
        best: dict[int, tuple[float, str]] = {}
        for f, (s, e) in zip(feats, outs):
            score, i, j = self.best_span(s, e, f)
            r = records[f["record"]]
            text = r["context"][f["offsets"][i][0]:f["offsets"][j][1]]
            if f["record"] not in best or score > best[f["record"]][0]:
                best[f["record"]] = (score, text)
        return [best.get(i, (0.0, ""))[1] for i in range(len(records))]

    def score(self, split: str, feats, outs) -> dict:
        records = self.eval_records(split)
        preds = self.predictions(split, feats, outs)
        em, f1 = metrics.squad_scores(preds, [r["answers"]["text"] for r in records])
        B, seed = self.opts["bootstrap"], data_seed(self.cfg)
        out = {"exact_match": float(em.mean()), "exact_match_ci": metrics.bootstrap_ci(lambda i: em[i].mean(), len(em), B, seed),
               "f1": float(f1.mean()), "f1_ci": metrics.bootstrap_ci(lambda i: f1[i].mean(), len(f1), B, seed),
               "examples": len(records), "per_example": f1.tolist()}  # F1 of each example: paired statistics
        dist = np.array([f["distance"] for f in feats if "distance" in f])
        if len(dist):
            out["evidence_distance"] = {"median": float(np.median(dist)), "p10": float(np.quantile(dist, 0.1)),
                                        "p90": float(np.quantile(dist, 0.9))}
        return out
