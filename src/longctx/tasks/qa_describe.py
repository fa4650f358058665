"""Long-document QA with sentence answers: "what does function X do?" over the default corpus.

In a pydoc page every function and method is a signature line (``dumps(obj, *, skipkeys=False, ...)``,
or `` |  append(...)`` inside a class) followed by its docstring, indented four more columns. An example
(SQuAD format, ``tasks/qa.py``: same features, decoding, SQuAD EM/F1 with bootstrap intervals):

- question: the function's name (``dumps``), encoded after a space as QA does, so a byte-level BPE
  spells it as on the signature line;
- answer: the first sentence of its description, as it stands in the page (line breaks and the class
  bars of a sentence over several lines included; SQuAD's normalisation drops them when scoring): at
  least ``task.min_answer_words`` words and at most ``task.max_answer_chars`` characters;
- context: ``task.context_chars`` characters of the page around it, drawn so that the signature starts
  beyond ``task.far_fraction`` of the context (and the answer ends inside it), at a line start.

The model must find the name in the context (one attention hop from the global question tokens), then
read the sentence that follows the signature: the evidence is far from the question, as in ``qa``.
An entry is kept when its signature is the only definition of that name in the context and its answer
the only occurrence of that sentence there (so the answer is never ambiguous), its name is public (no
``_``: dunder methods all read "Return self+value."), and its docstring does not open with a signature
of its own (``D.count(value) -> integer``, C functions' style). One example per (name, sentence) in a
page: inherited methods repeated in every subclass count once. Pages are split into train / dev / test
by module (``builtin.corpus_splits``) before any example is made.
"""
from __future__ import annotations

import random
import re

from longctx.tasks.base import register
from longctx.tasks.builtin import corpus_splits
from longctx.tasks.common import SPLITS
from longctx.tasks.qa import QATask

# a signature line: a prefix of spaces and class bars, a public name, its argument list
_SIGNATURE = re.compile(r"^(?P<prefix>    (?: \|  )*)(?P<name>[A-Za-z][A-Za-z0-9_]*)\(.*$", re.M)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_OPENS_WITH_CALL = re.compile(r"^[\w.]+\(")


def definitions(text: str, min_words: int, max_chars: int) -> list[tuple[str, int, int, int]]:
    """``(name, signature start, answer start, answer end)`` of every described function in a page."""
    out, seen = [], set()
    for m in _SIGNATURE.finditer(text):
        body = m.group("prefix") + "    "  # the docstring's indentation
        pos = m.end() + 1
        a = b = None
        while text.startswith(body, pos):  # the first paragraph: lines at the docstring's indentation
            line_end = text.find("\n", pos)
            line_end = len(text) if line_end < 0 else line_end
            line = text[pos + len(body):line_end]
            content = line_end - len(line.lstrip())
            if content >= line_end:
                break  # a blank line of the docstring ends the paragraph
            if a is None:
                a = content
            end = _SENTENCE_END.search(text, content, line_end)
            if end:
                b = end.end()
                break
            pos = line_end + 1
        if a is None or b is None or b - a > max_chars:
            continue
        answer = text[a:b]
        if len(answer.split()) < min_words or _OPENS_WITH_CALL.match(answer) or (m.group("name"), answer) in seen:
            continue
        seen.add((m.group("name"), answer))
        out.append((m.group("name"), m.start() + len(m.group("prefix")), a, b))
    return out


def describe_records(docs: list[dict], context_chars: int, far_fraction: float, seed: int,
                     min_words: int = 3, max_chars: int = 200) -> list[dict]:
    """SQuAD-style rows ``{id, doc, question, context, answers}``, one per kept definition."""
    rng = random.Random(seed)
    out = []
    for doc in docs:
        text = doc["text"]
        for k, (name, sig, a, b) in enumerate(definitions(text, min_words, max_chars)):
            # the signature beyond far_fraction of the context, the answer inside it
            lo, hi = max(0, b - context_chars), sig - int(far_fraction * context_chars)
            if hi < lo:
                continue
            start = rng.randint(lo, hi)
            start = text.find("\n", start, hi) + 1 or start  # at a line start when one is near
            context = text[start:start + context_chars]
            answer = text[a:b]
            definition = re.compile(rf"^[ |]*{re.escape(name)}\(", re.M)
            if len(definition.findall(context)) != 1 or context.count(answer) != 1:
                continue
            out.append({"id": f"{doc['id']}:{k}", "doc": doc["id"], "question": name, "context": context,
                        "answers": {"text": [answer], "answer_start": [a - start]}})
    return out


@register
class DescribeQATask(QATask):
    name = "qa_describe"
    OPTIONS = {"max_answer_length": 64, "doc_stride": 128, "max_question_tokens": 64,
               # the built-in data
               "context_chars": 2000, "far_fraction": 0.5, "min_answer_words": 3, "max_answer_chars": 200}
    CONFIG = {"data": {"seq_len": 512}, "model": {"max_position_embeddings": 4096},
              "train": {"steps": 200, "batch_size": 8, "lr": 1e-3, "warmup_steps": 20, "eval_batches": 1}}

    def load_splits(self):
        o = self.opts
        if any(o[f"{s}_file"] for s in SPLITS):
            return super().load_splits()
        self._docs = corpus_splits(self.cfg["seed"])
        return {s: describe_records(self._docs[s], o["context_chars"], o["far_fraction"], self.cfg["seed"] + i,
                                    o["min_answer_words"], o["max_answer_chars"]) for i, s in enumerate(SPLITS)}
