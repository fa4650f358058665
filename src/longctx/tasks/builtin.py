"""Built-in task data, made from the default corpus (the standard library's pydoc text shipped with
longctx, ``longctx.corpora.default_corpus``: the same on every machine), so finetuning runs with nothing
downloaded. Documents are split into train / dev / test by module before any example is made
(``corpus_splits``); ``tasks/qa_describe.py`` builds its sentence-answer QA from the same splits.

- ``qa_records``, long-document QA (SQuAD format): the context is a stretch of one module's page; the
  question is a *key word* that occurs exactly once in that context, placed in its far part (beyond
  ``far_fraction`` of it); the answer is that word's occurrence (``answer_offset=0``, the default) or the
  word right after it (``answer_offset=1``; then itself unique in the context, a plain word and not one
  of the ``frequent_words`` commonest words, so it is not guessable without the question). A model
  finds the answer only by matching the question against the whole context, so the evidence sits
  far from the question: a sliding window without global tokens cannot reach it, global question
  tokens (Longformer's QA preset) or full attention can. Why the occurrence is the default: one
  attention hop finds it (a context token scores the global question token by identity), while the
  next word needs two (previous-token, then match), which a tiny model does not learn within a test
  or default-compare budget (measured: no separation from the no-global model after 300 steps).
- ``section_records``, long-document classification: a stretch of a page that starts in one section
  and ends in another (NAME / DESCRIPTION / CLASSES / FUNCTIONS / DATA ...); the label is the section
  it ends in. The evidence (the last heading and the text after it) lies in the second half, far from
  the first token that classifies.
- ``pair_records``, document matching: two stretches of text, from the same module's page (label 1)
  or from two different pages (label 0), balanced.
"""
from __future__ import annotations

import random
import re
from collections import Counter

from longctx.data.corpus import load_documents
from longctx.tasks.common import split_by_document

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECTION_LABELS = ("DESCRIPTION", "CLASSES", "FUNCTIONS", "DATA")


def corpus_splits(seed: int) -> dict[str, list[dict]]:
    return split_by_document(load_documents("default"), lambda d: d["id"], seed)


def _cut(text: str, start: int, length: int) -> tuple[int, int]:
    """A stretch of about ``length`` characters from ``start``, ending at a line end when one is near."""
    end = min(len(text), start + length)
    nl = text.rfind("\n", start + length // 2, end)
    return start, (nl if nl > 0 and end < len(text) else end)


def qa_records(docs: list[dict], context_chars: int, far_fraction: float, questions_per_context: int,
               seed: int, min_key_chars: int = 4, frequent_words: int = 300, answer_offset: int = 1) -> list[dict]:
    rng = random.Random(seed)
    common = {w for w, _ in Counter(m.group() for d in docs for m in _WORD.finditer(d["text"])).most_common(frequent_words)}
    out = []
    for doc in docs:
        text = doc["text"]
        for c, a in enumerate(range(0, max(1, len(text) - context_chars // 2), context_chars)):
            a, b = _cut(text, a, context_chars)
            context = text[a:b]
            words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(context)]
            counts = Counter(w for *_, w in words)
            # a key word unique in the context, in its far part, followed on its line by a word that is
            # unique too (so no answer is guessable without the question: not 'self', 'the', ...)
            # Both words follow a space, so a byte-level BPE spells them as it spells the question (which
            # the QA features encode after a space) and the answer starts a pre-token; the answer is a
            # plain word (SQuAD's normalisation drops '_', so a part of 'a_b' would score 0).
            keys = [i for i in range(len(words) - 1)
                    if counts[words[i][2]] == 1 and counts[words[i + 1][2]] == 1 and len(words[i][2]) >= min_key_chars
                    and words[i + 1][2] not in common and words[i + 1][2].isalpha()
                    and words[i][0] >= far_fraction * len(context)
                    and context[words[i][0] - 1:words[i][0]] == " " and context[words[i][1]:words[i + 1][0]] == " "]
            for k, i in enumerate(sorted(rng.sample(keys, min(questions_per_context, len(keys))))):
                start, end, _ = words[i + answer_offset]
                out.append({"id": f"{doc['id']}:{c}:{k}", "doc": doc["id"], "context": context,
                            "question": words[i][2],
                            "answers": {"text": [context[start:end]], "answer_start": [start]}})
    return out


def _sections(doc: dict) -> list[tuple[int, str]]:
    return [(s["start"], doc["text"][s["start"]:s["end"]].strip()) for s in doc.get("structure", [])
            if s["kind"] == "section"]


def section_records(docs: list[dict], context_chars: int, seed: int, per_heading: int = 3) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for doc in docs:
        text = doc["text"]
        seen = set()
        for j, (pos, name) in enumerate(_sections(doc)):
            if name not in SECTION_LABELS or pos < context_chars // 4:
                continue
            for k in range(per_heading):
                # the heading lands in the second half of the stretch (or as late as the page allows)
                start = max(0, pos - int(context_chars * rng.uniform(0.5, 0.95)))
                start = text.rfind("\n", 0, start) + 1
                a, b = _cut(text, start, context_chars)
                if b - pos < context_chars // 20 or (a, b) in seen:
                    continue
                seen.add((a, b))
                out.append({"id": f"{doc['id']}:{j}:{k}", "doc": doc["id"], "text": text[a:b], "label": name})
    return out


def pair_records(docs: list[dict], context_chars: int, seed: int, pairs_per_doc: int = 4) -> list[dict]:
    rng = random.Random(seed)
    long_docs = [d for d in docs if len(d["text"]) >= 2 * context_chars]
    out = []
    if len(long_docs) < 2:
        return out

    def stretch(doc, half):
        """A stretch from the first or the second half of the page: two from one page never overlap."""
        n = len(doc["text"]) // 2
        a = rng.randrange(half * n, (half + 1) * n - context_chars + 1)
        a = doc["text"].rfind("\n", half * n, a) + 1 or a
        s, e = _cut(doc["text"], a, context_chars)
        return doc["text"][s:e]

    for doc in long_docs:
        for k in range(pairs_per_doc):
            same = k % 2 == 0
            other = doc if same else rng.choice([d for d in long_docs if d is not doc])
            out.append({"id": f"{doc['id']}:{k}", "doc": doc["id"], "text1": stretch(doc, 0),
                        "text2": stretch(other, 1), "label": int(same)})
    return out
