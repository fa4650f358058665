"""RULER-style synthetic long-context tasks (Hsieh et al. 2024), generated offline at any length by a
seeded generator, each in two forms: extractive QA (SQuAD-format records; ``tasks/qa.py``: same features,
decoding and SQuAD EM/F1 with bootstrap intervals), which an encoder is finetuned on, and generation, what a
decoder is evaluated on (the last paragraph):

- ``ruler_niah_single``: one needle "One of the special magic numbers for KEY is: VALUE." in a
  haystack; question: the key; answer: the value.
- ``ruler_niah_multikey``: ``num_keys`` needles with different keys (the others are distractors).
- ``ruler_niah_multivalue``: ``num_values`` needles with the same key; every value is a gold answer.
- ``ruler_niah_multiquery``: ``num_keys`` needles, ``num_queries`` of them asked: one record per asked key.
- ``ruler_vt``: variable tracking, chains "VAR A = 12345." "VAR B = A." ... spread over the haystack
  (``num_chains`` chains of ``num_hops`` hops); question: the value of a chain's last variable; answer:
  the number its chain starts from (a multi-hop search: the last name appears once, next to the previous).
- ``ruler_cwe``: common-words extraction, a numbered list of words where ``num_common`` words appear
  ``freq_common`` times and the others ``freq_uncommon`` times; answer: the most common word(s).
- ``ruler_fwe``: frequent-words extraction, a stream of coded words drawn from a Zipf law (exponent
  ``alpha``); answer: the ``num_frequent`` most frequent word(s).
- ``ruler_qa``: QA with distractor documents: one pydoc definition (a function's signature line and
  the first sentence of its description, as in ``qa_describe``) among others from the same split;
  question: the function's name; answer: its sentence.

Answers with several items (multi-value, cwe and fwe with more than one word): an extractive encoder
predicts one span, so the record lists every item as a gold answer (SQuAD's several-answers form) and a
prediction of any one of them is exact; training targets the first listed, the one at the requested depth
(multi-value) or the commonest word's first occurrence (cwe, fwe). A multi-query context gives one record
per asked key, which is what an extractive model can answer.

Haystacks (``task.haystack``): ``corpus``, consecutive lines of the default corpus's pages of the split
(pages split into train / dev / test by module, ``builtin.corpus_splits``), or ``noise``, RULER's
repeated sentences ("The grass is green. The sky is blue. ..."). cwe and fwe are word lists of their own
and ruler_qa's haystack is always its distractor definitions. Needles go at line (sentence) starts, the
evidence at ``task.depth`` of the haystack (the share before it; a list to sweep; unset: uniform). Lengths
(``task.length``, an integer or a list to sweep) are in ``task.length_unit``: ``chars`` (exact) or
``tokens`` of the task's tokenizer (the longest context with at most that many). Every record keeps its
``length`` (requested) and ``depth`` (where the evidence landed; cwe / fwe: the answer's first
occurrence over the context); the evaluation adds exact match and F1 by depth bin (``task.depth_bins``)
and by length, and ``depth_length_heatmap`` draws them. Each split has its own random stream (``seed:split``), so splits never share a draw.

The generation form (``task.form: generation``; default ``extractive``), what a decoder is evaluated on: the
same records (multi-query's excepted, below) become a prompt and an answer for a causal LM (``LongctxForCausalLM``; the run's objective is
clm). The prompt is RULER's order, the context, then the query, then an answer prefix (NVIDIA/RULER
``scripts/data/synthetic/constants.py``: each task's ``template`` ends with the query and its
``answer_prefix`` follows; we keep our questions and use its qa prefix, ``" Answer:"``, for every task); the
answer is every gold item in the order of the context, ", "-joined, and an end token. Finetuning puts the loss
on the answer and end tokens only. Evaluation decodes greedily with the model's own ``generate`` (key-value
cache), at most ``task.max_new_tokens`` new tokens (RULER's ``tokens_to_generate``, sized here for our answers)
and never past ``data.seq_len`` positions, and scores with RULER's metrics (``scripts/eval/synthetic/
constants.py``, after ``postprocess_pred`` of ``scripts/eval/evaluate.py``): ``string_match_all`` (the share of
gold items in the prediction; niah, vt, cwe, fwe) and ``string_match_part`` (any gold item; qa), plus SQuAD
exact match against the answer. Multi-query asks all its keys in one prompt, as RULER does ("A, B, and C"). A
prompt that does not fit is refused, never cut: the part cut could hold the needle.
"""
from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import torch

from longctx import plots
from longctx.errors import LongctxError
from longctx.models import LongctxForCausalLM, LongctxForQuestionAnswering
from longctx.models.loading import read_longctx_config
from longctx.tasks import metrics
from longctx.tasks.base import data_seed, register
from longctx.tasks.builtin import corpus_splits
from longctx.tasks.common import SPLITS
from longctx.tasks.qa import QATask
from longctx.tasks.qa_describe import definitions

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_TRIES = 50  # draws before a generator gives up (a value that happens to occur in the haystack, ...)


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    """A pronounceable made-up word ("bafiru"): not in the corpus, spelled by any tokenizer."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _distinct(rng, n: int, make) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = make(rng)
        if w not in out:
            out.append(w)
    return out


def _count_word(text: str, word: str) -> int:
    return len(re.findall(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text))


class Source:
    """What a split's draws are made from: its corpus pages, the haystack kind, the length unit."""

    def __init__(self, opts: dict, docs: list[dict], measure):
        self.opts, self.docs, self.measure = opts, docs, measure
        self._definitions = None

    def capacity(self, length: int) -> int:
        """Characters enough for ``length`` units (a token is at most a few characters)."""
        return length if self.opts["length_unit"] == "chars" else 8 * length

    def haystack(self, rng, chars: int) -> tuple[list[str], str, list[str]]:
        """(units, separator, page ids): at least ``chars`` characters of haystack."""
        units, total = [], 0
        if self.opts["haystack"] == "noise":
            i = rng.randrange(len(NOISE))
            while total < chars:
                units.append(NOISE[i % len(NOISE)])
                total, i = total + len(units[-1]) + 1, i + 1
            return units, " ", []
        if not self.docs:
            raise LongctxError("this split has no corpus pages for a haystack; use task.haystack=noise")
        k, ids = rng.randrange(len(self.docs)), []
        lines = self.docs[k]["text"].split("\n")
        lines = lines[rng.randrange(len(lines)):]
        while True:
            ids.append(self.docs[k]["id"])
            for line in lines:
                units.append(line)
                total += len(line) + 1
                if total >= chars:
                    return units, "\n", ids
            k = (k + 1) % len(self.docs)  # the next page (round again when the split is short)
            lines = self.docs[k]["text"].split("\n")

    def definitions(self) -> list[tuple[str, str, int, str, str]]:
        """(name, paragraph, answer offset, answer, page id) of every described function of the split."""
        if self._definitions is None:
            self._definitions = []
            for d in self.docs:
                t = d["text"]
                for name, sig, a, b in definitions(t, 3, 200):
                    start = t.rfind("\n", 0, sig) + 1
                    self._definitions.append((name, t[start:b], a - start, t[a:b], d["id"]))
        return self._definitions


def place(units: list[str], sep: str, needles: list[tuple[float, str]], n: int):
    """The haystack cut to ``n`` characters with each needle ``(depth, text)`` inserted at the unit start
    nearest ``depth`` of the haystack (RULER's depth: the share of the haystack before the needle; 1.0
    lands before the last, cut, unit); returns the context, each needle's start in it and its measured
    depth (in order)."""
    hay = sep.join(units)[:n]
    cuts = [0] + [m.end() for m in re.finditer(re.escape(sep), hay) if m.end() < n]  # unit starts
    order = sorted(range(len(needles)), key=lambda i: needles[i][0])
    pieces, at, starts, depths = [], 0, [0] * len(needles), [0.0] * len(needles)
    for i in order:
        b = max(at, min(cuts, key=lambda c: abs(c - needles[i][0] * n)))
        pieces.append(hay[at:b])
        text = needles[i][1] + sep  # the context is n characters and the needles with their separators
        starts[i] = sum(map(len, pieces))
        depths[i] = b / max(1, n)
        pieces.append(text)
        at = b
    pieces.append(hay[at:])
    return "".join(pieces), starts, depths


def fit(cut, length: int, measure, capacity: int):
    """``cut(n)`` at the largest ``n`` <= ``capacity`` whose context (its first item) measures at most
    ``length``: exact in characters, the longest that fits in tokens."""
    if measure(cut(capacity)[0]) < length:
        raise LongctxError(f"the generator could not make a context of length {length}; use a shorter task.length")
    lo, hi = 0, capacity
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if measure(cut(mid)[0]) <= length:
            lo = mid
        else:
            hi = mid - 1
    return cut(lo)


def _record(context: str, question: str, answers: list[tuple[str, int]], depth: float, length: int, docs) -> dict:
    return {"question": question, "context": context, "doc": list(docs), "length": length, "depth": depth,
            "answers": {"text": [a for a, _ in answers], "answer_start": [s for _, s in answers]}}


def _depths(rng, depth: float, n: int) -> list[float]:
    """The target at ``depth``, the other ``n - 1`` needles anywhere."""
    return [depth] + [rng.random() for _ in range(n - 1)]


# ---- the generators: (rng, source, length, depth) -> records, or None to draw again ----

def _niah(rng, src, length, depth, n_keys=1, n_values=1, n_queries=1, all_values=False):
    keys = _distinct(rng, n_keys, lambda r: pseudo_word(r, 4))
    vals = _distinct(rng, n_keys - 1 + n_values, lambda r: str(r.randrange(10 ** 6, 10 ** 7)))
    # key 0 holds n_values values, the other keys one each; the first needle is the target
    items = [(keys[0], v) for v in vals[:n_values]] + list(zip(keys[1:], vals[n_values:]))
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in items]
    depths = _depths(rng, depth, len(needles))
    units, sep, docs = src.haystack(rng, src.capacity(length))
    context, starts, where = fit(lambda n: place(units, sep, list(zip(depths, needles)), n), length, src.measure,
                                 src.capacity(length))
    if any(context.count(v) != 1 for v in vals) or any(_count_word(context, k) != sum(k == x for x, _ in items)
                                                       for k in keys):
        return None
    out = []
    asked = [0] if n_values > 1 else [next(i for i, (k, _) in enumerate(items) if k == keys[q]) for q in range(n_queries)]
    if len(asked) > 1 and src.opts["form"] == "generation":  # RULER's multi-query: one prompt asks every key
        asked_keys = [items[i][0] for i in asked]
        q = ", ".join(asked_keys[:-1]) + ", and " + asked_keys[-1]
        answers = [(items[i][1], starts[i] + len(needles[i]) - len(items[i][1]) - 1) for i in asked]
        return [_record(context, f"What are all the special magic numbers for {q}?", answers, where[asked[0]],
                        length, docs)]
    for i in asked:
        key = items[i][0]
        mine = [j for j, (k, _) in enumerate(items) if k == key] if all_values else [i]
        answers = [(items[j][1], starts[j] + len(needles[j]) - len(items[j][1]) - 1) for j in mine]
        q = f"What are all the special magic numbers for {key}?" if all_values else \
            f"What is the special magic number for {key}?"
        out.append(_record(context, q, answers, where[i], length, docs))
    return out


def niah_single(rng, src, length, depth):
    return _niah(rng, src, length, depth)


def niah_multikey(rng, src, length, depth):
    return _niah(rng, src, length, depth, n_keys=src.opts["num_keys"])


def niah_multivalue(rng, src, length, depth):
    return _niah(rng, src, length, depth, n_values=src.opts["num_values"], all_values=True)


def niah_multiquery(rng, src, length, depth):
    o = src.opts
    if o["num_queries"] > o["num_keys"]:
        raise LongctxError(f"task.num_queries={o['num_queries']} asks more keys than task.num_keys={o['num_keys']}")
    return _niah(rng, src, length, depth, n_keys=o["num_keys"], n_queries=o["num_queries"])


def variable_tracking(rng, src, length, depth):
    o = src.opts
    names = _distinct(rng, o["num_chains"] * (o["num_hops"] + 1),
                      lambda r: "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    values = _distinct(rng, o["num_chains"], lambda r: str(r.randrange(10 ** 4, 10 ** 5)))
    chains = [names[c * (o["num_hops"] + 1):(c + 1) * (o["num_hops"] + 1)] for c in range(o["num_chains"])]
    statements = [f"VAR {ch[0]} = {v}." for ch, v in zip(chains, values)]  # the target chain's first
    statements += [f"VAR {ch[h]} = {ch[h - 1]}." for ch in chains for h in range(1, len(ch))]
    depths = _depths(rng, depth, len(statements))
    units, sep, docs = src.haystack(rng, src.capacity(length))
    context, starts, where = fit(lambda n: place(units, sep, list(zip(depths, statements)), n), length,
                                 src.measure, src.capacity(length))
    if any(context.count(v) != 1 for v in values) or \
            any(_count_word(context, x) != (1 if x == ch[-1] else 2) for ch in chains for x in ch):
        return None
    answer = (values[0], starts[0] + len(statements[0]) - len(values[0]) - 1)
    return [_record(context, f"What is the value of VAR {chains[0][-1]}?", [answer], where[0],
                    length, docs)]


def _word_answers(context: str, words: list[str]) -> list[tuple[str, int]]:
    return [(w, re.search(rf"(?<![\w-]){w}(?![\w-])", context).start()) for w in words]


def common_words(rng, src, length, depth):
    o = src.opts
    cap = src.capacity(length)
    common = _distinct(rng, o["num_common"], lambda r: pseudo_word(r, 3))
    items, chars = [], 0
    while chars < cap:  # the common words, then uncommon ones until the list (rendered below) is long enough
        w = common[len(items) // o["freq_common"]] if len(items) < len(common) * o["freq_common"] else pseudo_word(rng, 3)
        if w in common and len(items) >= len(common) * o["freq_common"]:
            continue
        for _ in range(o["freq_common"] if w in common else o["freq_uncommon"]):
            items.append(w)
            chars += len(str(len(items))) + len(w) + 3  # "12. word "
    rng.shuffle(items)
    text = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    context = fit(lambda n: (text[:n],), length, src.measure, min(cap, len(text)))[0]
    counts = Counter(re.findall(r"[a-z]+", context))
    if sorted(w for w, c in counts.items() if c > o["freq_uncommon"]) != sorted(common):
        return None
    answers = _word_answers(context, common)
    q = "What is the most common word in the list?" if len(common) == 1 else \
        f"What are the {len(common)} most common words in the list?"
    return [_record(context, q, answers, answers[0][1] / len(context), length, [])]


def frequent_words(rng, src, length, depth):
    o = src.opts
    cap = src.capacity(length)
    vocab = _distinct(rng, o["vocab_words"], lambda r: pseudo_word(r, 3))
    weights = [1 / (k + 1) ** o["alpha"] for k in range(len(vocab))]
    words, chars = [], 0
    while chars < cap:
        words += rng.choices(vocab, weights, k=64)
        chars = sum(len(w) + 1 for w in words)
    text = " ".join(words)
    context = fit(lambda n: (text[:n],), length, src.measure, min(cap, len(text)))[0]
    ranked = Counter(re.findall(r"[a-z]+", context)).most_common(o["num_frequent"] + 1)
    k = o["num_frequent"]
    if len(ranked) <= k or ranked[k - 1][1] == ranked[k][1]:
        return None  # no strict top-k
    answers = _word_answers(context, [w for w, _ in ranked[:k]])
    q = "What is the most frequent coded word in the text?" if k == 1 else \
        f"What are the {k} most frequent coded words in the text?"
    return [_record(context, q, answers, answers[0][1] / len(context), length, [])]


def qa_distractors(rng, src, length, depth):
    defs = src.definitions()
    if len(defs) < 2:
        raise LongctxError("this split has too few described functions for ruler_qa")
    name, para, offset, answer, doc = rng.choice(defs)
    pool = [d for d in defs if f"{name}(" not in d[1] and answer not in d[1]]
    rng.shuffle(pool)
    cap, units, total, docs = src.capacity(length), [], 0, [doc]
    for d in pool:
        if total >= cap:
            break
        units.append(d[1])
        total += len(d[1]) + 2
        docs.append(d[4])
    if total < cap:
        raise LongctxError(f"this split has {total} characters of distractor definitions, fewer than a context "
                           f"of task.length={length} {src.opts['length_unit']} needs; use a shorter length")
    context, (start,), (where,) = fit(lambda n: place(units, "\n\n", [(depth, para)], n), length, src.measure, cap)
    if context.count(answer) != 1:
        return None
    return [_record(context, name, [(answer, start + offset)], where, length, sorted(set(docs)))]


def _grid(value, name: str, kind, default):
    """An option that is a number or a list of numbers (a sweep), as a list."""
    vals = default if value is None else value if isinstance(value, list) else [value]
    if not vals or not all(isinstance(v, kind) and not isinstance(v, bool) for v in vals):
        raise LongctxError(f"config key 'task.{name}' must be a number or a list of numbers, got {value!r}")
    return vals


def generate(draw, src: Source, size: int, seed: str) -> list[dict]:
    """``size`` records of ``draw``: draw i at length ``lengths[i % L]`` and depth ``depths[(i // L) % D]``
    (every pair of a sweep), or a uniform depth when none is set."""
    o = src.opts
    lengths = _grid(o["length"], "length", int, [2000 if o["length_unit"] == "chars" else 512])
    depths = None if o["depth"] is None else _grid(o["depth"], "depth", (int, float), None)
    if any(n < 1 for n in lengths) or (depths and any(not 0 <= d <= 1 for d in depths)):
        raise LongctxError("task.length must be positive and task.depth within [0, 1]")
    rng = random.Random(seed)
    out, i = [], 0
    while len(out) < size:
        length = lengths[i % len(lengths)]
        depth = rng.random() if depths is None else float(depths[(i // len(lengths)) % len(depths)])
        for _ in range(_TRIES):
            recs = draw(rng, src, length, depth)
            if recs:
                break
        else:
            raise LongctxError(f"could not draw a valid example at length {length} in {_TRIES} tries; "
                               "use a longer task.length or other task options")
        out += [{"id": f"{seed}:{i}:{q}", **r} for q, r in enumerate(recs)]
        i += 1
    return out[:size]


def depth_bins_of(depths, bins: int) -> tuple[np.ndarray, list[str]]:
    """Each depth's bin (``bins`` equal bins of [0, 1], 1.0 in the last) and the bins' labels."""
    rows = np.minimum((np.asarray(depths, float) * bins).astype(int), bins - 1)
    return rows, [f"{r / bins:.2f}-{(r + 1) / bins:.2f}" for r in range(bins)]


def depth_length_table(depths, lengths, scores, depth_bins: int = 5):
    """(matrix [depth bin x length], depth-bin labels, lengths): the mean score of each cell (NaN: none)."""
    lengths, scores = np.asarray(lengths), np.asarray(scores, float)
    cols = sorted(set(lengths.tolist()))
    rows, labels = depth_bins_of(depths, depth_bins)
    m = np.full((depth_bins, len(cols)), np.nan)
    for r in range(depth_bins):
        for c, n in enumerate(cols):
            sel = (rows == r) & (lengths == n)
            if sel.any():
                m[r, c] = scores[sel].mean()
    return m, labels, cols


def cell_metric(evaluation: dict) -> str:
    """The metric a depth-by-length cell means for a RULER evaluation: RULER's string_match_all in the
    generation form (what RULER reports), exact match in the extractive form (and in runs of an older
    longctx, which recorded no other)."""
    return evaluation.get("depth_length_metric", "exact_match")


def depth_length_heatmap(path, evaluation: dict, depth_bins: int = 5, title: str | None = None):
    """``cell_metric`` by needle depth (rows) and context length (columns) of a RULER evaluation (the task's
    metrics dict, e.g. ``results.json``'s ``test``) as a PNG; returns the matrix drawn."""

    if "per_example_depth" not in evaluation:
        raise LongctxError("this evaluation has no per-example depths; it is not a RULER task's")
    metric = cell_metric(evaluation)
    m, rows, cols = depth_length_table(evaluation["per_example_depth"], evaluation["per_example_length"],
                                       evaluation[f"per_example_{metric}"], depth_bins)
    plots.heatmap_figure(path, m, rows, [str(c) for c in cols], "context length", "needle depth",
                         title=title or metric.replace("_", " "))
    return m


FORMS = ("extractive", "generation")


def form_of(opts: dict) -> str:
    """``task.form`` of the options ``opts`` (unset: extractive), checked."""
    form = opts.get("form") or "extractive"
    if form not in FORMS:
        raise LongctxError(f"config key 'task.form' must be extractive or generation, got {form!r}")
    return form
ANSWER_CUE = " Answer:"  # RULER's qa answer prefix; its other tasks' prefixes restate the question first


def prompt_text(record: dict) -> str:
    """The generation form's prompt: the context, then the question, then the answer cue (RULER's order)."""
    return f"{record['context']}\n{record['question']}{ANSWER_CUE}"


def answer_text(record: dict) -> str:
    """The generation form's gold answer: every gold item in the order of the context, ", "-separated."""
    a = record["answers"]
    return ", ".join(t for _, t in sorted(zip(a["answer_start"], a["text"])))


class RulerTask(QATask):
    """A RULER task: its generator (``draw``) and its own options on top of the QA task's; in the generation
    form (``task.form: generation``) a causal LM's task (module docstring)."""
    draw = None
    metric = "string_match_all"  # RULER's metric of the generation form
    new_tokens = 16  # the generation form's default task.max_new_tokens
    # form and max_new_tokens default to null (extractive, the task's new_tokens): an option added later and
    # unset asks for the same run (longctx.experiments.runs.config_diff), so earlier runs stay reusable
    OPTIONS = {**{k: QATask.OPTIONS[k] for k in ("max_answer_length", "doc_stride", "max_question_tokens", "max_chunks")},
               "length": None, "length_unit": "chars", "depth": None, "depth_bins": 5, "haystack": "corpus",
               "train_size": 2000, "dev_size": 200, "test_size": 200, "form": None, "max_new_tokens": None}
    OPTION_TYPES = {"form": (str,), "max_new_tokens": (int,)}
    CONFIG = {"data": {"seq_len": 1024}, "model": {"max_position_embeddings": 4096},
              "train": {"steps": 200, "batch_size": 4, "lr": 1e-3, "warmup_steps": 20, "eval_batches": 1}}

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.form = self.opts["form"] = form_of(self.opts)
        n = self.opts["max_new_tokens"]
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise LongctxError(f"config key 'task.max_new_tokens' must be a whole number of tokens (1 or more), got {n!r}")
        if self.form == "generation":  # a causal LM (global tokens: none, default_global_for)
            self.causal, self.primary_metric = True, type(self).metric

    @classmethod
    def default_global_for(cls, opts: dict) -> str:
        """The generation form has no global tokens: a decoder reads the question last, after the context."""
        return "none" if form_of(opts) == "generation" else cls.default_global

    @classmethod
    def objective_for(cls, opts: dict) -> str | None:
        """The objective the task's model is trained with, when the task fixes it (clm for the generation form)."""
        return "clm" if form_of(opts) == "generation" else None

    @classmethod
    def check_chunking(cls, o: dict, seq_len: int) -> None:
        if form_of(o) == "extractive":  # the generation form has no chunks
            super().check_chunking(o, seq_len)

    @property
    def model_class(self):
        return LongctxForCausalLM if self.form == "generation" else LongctxForQuestionAnswering

    def build_model(self, init_from: str | None = None):
        if init_from and self.form == "generation" and not read_longctx_config(init_from, "init_from").get("causal"):
            raise LongctxError(f"init_from {init_from} holds an encoder, and task.form=generation finetunes a causal LM; "
                               "use a model pretrained with objective=clm, or task.form=extractive")
        return super().build_model(init_from)

    def load_splits(self):
        o = self.opts
        if any(o[f"{s}_file"] for s in SPLITS):
            return super().load_splits()
        if o["length_unit"] not in ("chars", "tokens") or o["haystack"] not in ("corpus", "noise"):
            raise LongctxError("task.length_unit must be chars or tokens, and task.haystack corpus or noise")
        measure = len
        if o["length_unit"] == "tokens":
            tok = self.make_tokenizer()  # made from the corpus, not the records, so it exists before them
            measure = lambda text: len(tok.encode(text)[0])  # noqa: E731
        seed = data_seed(self.cfg)
        self._docs = corpus_splits(seed)
        return {s: generate(type(self).draw, Source(o, self._docs[s], measure), o[f"{s}_size"], f"{self.name}:{seed}:{s}")
                for s in SPLITS}

    def tokenizer_texts(self):
        return [d["text"] for d in self._docs["train"]] + list(NOISE)

    # ---- the generation form ----
    def end_id(self) -> int:
        tok = self.tokenizer
        return tok.eos_id if getattr(tok, "eos_id", None) is not None else tok.sep_id

    def featurize(self, records, seq_len: int, train: bool) -> list[dict]:
        """Extractive: QA features (chunks). Generation: the prompt's tokens, then (training) the answer's and
        the end token, labelled; the rest -100, so the loss is on the answer only. A prompt is never cut."""
        if self.form == "extractive":
            return super().featurize(records, seq_len, train)
        tok, end = self.tokenizer, self.end_id()
        prompts = tok.encode_batch([prompt_text(r) for r in records])
        answers = tok.encode_batch([" " + answer_text(r) for r in records]) if train else [([], [])] * len(records)
        feats = []
        for i, (r, (p, _), (a, _)) in enumerate(zip(records, prompts, answers)):
            need = len(p) + (len(a) + 1 if train else 1)  # an answer and its end, or room for one new token
            if need > seq_len:
                raise LongctxError(f"{r['id']}: its prompt of {len(p)} tokens{' and answer' if train else ''} needs "
                                   f"{need} positions, more than data.seq_len={seq_len} (a prompt is never cut, the "
                                   "needle may be in the part cut); use a longer data.seq_len or a shorter task.length")
            f = {"input_ids": np.array(p + (a + [end] if train else []), dtype=np.int32), "record": i,
                 "prompt_len": len(p)}
            if train:
                f["labels"] = np.array([-100] * len(p) + a + [end], dtype=np.int64)
            feats.append(f)
        return feats

    def label_tensors(self, examples) -> dict:
        if self.form == "extractive":
            return super().label_tensors(examples)
        n = max(len(e["input_ids"]) for e in examples)
        labels = torch.full((len(examples), n), -100, dtype=torch.long)
        for row, e in enumerate(examples):
            labels[row, :len(e["labels"])] = torch.as_tensor(e["labels"])
        return {"labels": labels}

    @torch.no_grad()
    def generate_answers(self, model, feats, seq_len: int, device=None) -> list[str]:
        """Each prompt decoded greedily by the model's own ``generate`` (key-value cache) up to
        ``task.max_new_tokens`` new tokens, never beyond ``seq_len`` positions, stopped at the end token."""
        limit, end = self.opts["max_new_tokens"] or type(self).new_tokens, self.end_id()
        out = []
        for f in feats:
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)[None]
            if device is not None:
                ids = ids.to(device)
            new = model.generate(ids, max_new_tokens=min(limit, seq_len - ids.shape[1]), eos_token_id=end)[0, ids.shape[1]:]
            new = new.tolist()
            out.append(metrics.ruler_postprocess(self.tokenizer.decode(new[:new.index(end)] if end in new else new)))
        return out

    def evaluate(self, model, split: str = "dev", *, seq_len: int | None = None, batch_size: int | None = None,
                 device=None, **kw) -> dict:
        if self.form == "extractive":
            return super().evaluate(model, split, seq_len=seq_len, batch_size=batch_size, device=device, **kw)
        seq_len = seq_len or self.cfg["data"]["seq_len"]
        preds = self.generate_answers(model, self.eval_examples(split, seq_len), seq_len, device)
        return {"split": split, **self.score_generation(split, preds)}

    def score_generation(self, split: str, preds: list[str]) -> dict:
        """RULER's string matches and exact match (SQuAD-normalised, against ``answer_text``) of each example,
        each with a bootstrap interval; per example the primary metric (paired statistics), and the breakdown."""
        records = self.eval_records(split)
        golds = [r["answers"]["text"] for r in records]
        scores = {"exact_match": np.array([metrics.squad_exact(p, answer_text(r)) for p, r in zip(preds, records)]),
                  "string_match_all": np.array([metrics.string_match_all(p, g) for p, g in zip(preds, golds)]),
                  "string_match_part": np.array([metrics.string_match_part(p, g) for p, g in zip(preds, golds)])}
        B, seed = self.opts["bootstrap"], data_seed(self.cfg)
        out = {}
        for name, v in scores.items():
            out[name] = float(v.mean())
            out[f"{name}_ci"] = metrics.bootstrap_ci(lambda i, v=v: v[i].mean(), len(v), B, seed)
        out.update(examples=len(records), per_example=scores[self.primary_metric].tolist(),
                   predictions=preds[:20])  # the first predictions, to read what the model writes
        if records and "depth" in records[0]:
            out.update(self.breakdown(records, {"exact_match": scores["exact_match"],
                                                "string_match_all": scores["string_match_all"],
                                                self.primary_metric: scores[self.primary_metric]}))
        return out

    # ---- both forms ----
    def breakdown(self, records, scores: dict) -> dict:
        """By depth bin and by length: each metric's mean and the examples; and the per-example depths,
        lengths and exact matches, and RULER's string_match_all where there is one (``depth_length_heatmap``'s
        input: ``cell_metric``)."""
        depth, length = [r["depth"] for r in records], [r["length"] for r in records]
        rows, labels = depth_bins_of(depth, self.opts["depth_bins"])
        ln = np.asarray(length)

        def cell(sel):
            return {**{k: float(v[sel].mean()) for k, v in scores.items()}, "examples": int(sel.sum())}

        return {"by_depth": {label: cell(rows == r) for r, label in enumerate(labels) if (rows == r).any()},
                "by_length": {str(n): cell(ln == n) for n in sorted(set(length))},
                "per_example_depth": depth, "per_example_length": length,
                "per_example_exact_match": scores["exact_match"].tolist(),
                **({"depth_length_metric": "string_match_all",
                    "per_example_string_match_all": scores["string_match_all"].tolist()}
                   if "string_match_all" in scores else {})}

    def score(self, split: str, feats, outs) -> dict:
        out = super().score(split, feats, outs)
        records = self.eval_records(split)
        if not records or "depth" not in records[0]:
            return out  # the user's own files
        em, f1 = metrics.squad_scores(self.predictions(split, feats, outs), [r["answers"]["text"] for r in records])
        out.update(self.breakdown(records, {"exact_match": em, "f1": f1}))
        return out


def _task(name: str, draw, options: dict | None = None, config: dict | None = None, **attrs):
    attrs.update(name=name, draw=staticmethod(draw), OPTIONS={**RulerTask.OPTIONS, **(options or {})})
    if config:
        attrs["CONFIG"] = config
    return register(type("".join(p.title() for p in name.split("_")) + "Task", (RulerTask,), attrs))


_task("ruler_niah_single", niah_single)
_task("ruler_niah_multikey", niah_multikey, {"num_keys": 4})
_task("ruler_niah_multivalue", niah_multivalue, {"num_values": 4}, new_tokens=48)
_task("ruler_niah_multiquery", niah_multiquery, {"num_keys": 4, "num_queries": 2}, new_tokens=32)
_task("ruler_vt", variable_tracking, {"num_chains": 1, "num_hops": 4})
_task("ruler_cwe", common_words, {"num_common": 1, "freq_common": 30, "freq_uncommon": 3})
_task("ruler_fwe", frequent_words, {"num_frequent": 1, "alpha": 2.0, "vocab_words": 100})
_task("ruler_qa", qa_distractors, {"max_answer_length": 64}, metric="string_match_part", new_tokens=64)
