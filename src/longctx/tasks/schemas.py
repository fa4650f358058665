"""Real long-document datasets from local files: ``task.dataset=PATH`` read as splits, ``task.schema=NAME``
mapping a published dataset's fields to the task it is.

``PATH`` (``read_dataset``) is a folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict``:
its splits; a ``Dataset``: one split), a folder of Parquet / JSON / JSON lines / CSV / Arrow files (the
split of each file from its name or its folder's: ``train-00000-of-00002.parquet``,
``validation.jsonl``, ``dev-v1.1.json``, ``test/part-0.parquet``; a hub repository's layout as it is
downloaded), or one such file (then one split). Split names: ``train``; ``validation`` / ``dev`` /
``val`` / ``valid``; ``test``.

Schemas (the fields of each dataset's published card; rows read as they are published):

- ``squad``: ``{id, title, context, question, answers: {text, answer_start}}`` (the default for ``qa``);
- ``triviaqa`` (``trivia_qa``, config ``rc``): ``question``, ``question_id``, ``entity_pages:
  {wiki_context: [...]}``, ``search_results: {search_context: [...]}``, ``answer: {value, aliases, ...}``
  -> extractive QA over the Wikipedia pages then the web results (joined by blank lines); the gold answers
  are the value and aliases that occur in that document (at their first occurrence); a question none of
  them occurs in is dropped (counted in the log);
- ``hotpotqa`` (``hotpot_qa``, config ``distractor``): ``id``, ``question``, ``answer``, ``context:
  {title: [...], sentences: [[...]]}``, ``supporting_facts: {title, sent_id}`` -> extractive QA over the ten
  paragraphs ("title: sentences", blank lines between), the answer at its occurrence in a supporting
  sentence (else its first); yes / no answers (comparison questions) are not spans: dropped, counted;
- ``qasper`` (``allenai/qasper``): a paper per row, ``id``, ``title``, ``abstract``, ``full_text:
  {section_name, paragraphs}``, ``qas: {question, question_id, answers: [{answer: [{extractive_spans,
  free_form_answer, yes_no, unanswerable, ...}]}]}`` -> one extractive QA record per question whose
  annotators' extractive spans occur in the paper (every such span a gold answer); questions answered
  only free-form, yes / no or unanswerable are dropped, counted;
- ``narrativeqa`` (``deepmind/narrativeqa``): ``document: {id, text, summary: {text}}``, ``question:
  {text}``, ``answers: [{text}]`` -> free-form answers: extractive QA over the story when an answer occurs
  in it (the answers that do are the gold ones), else dropped, counted;
- ``quality`` (QuALITY's release, one article per row: ``article_id``, ``title``, ``article``,
  ``questions: [{question, question_unique_id, options: [4], gold_label: 1..4}]``; or one question per row
  with ``article``, ``question``, ``options`` and ``gold_label``) -> multiple choice (``--task
  multiple_choice``); a question without ``gold_label`` (the test release) is unlabelled;
- SCROLLS (``tau/scrolls``: ``id``, ``pid``, ``input``, ``output``; the input is the query, a blank line,
  the document): ``scrolls_qasper`` and ``scrolls_narrative_qa`` -> extractive QA as above (rows sharing
  an ``id`` are one question with several gold answers), ``scrolls_quality`` -> multiple choice (the
  options ``(A) ... (D)`` parsed from the query, the output matched to one), ``scrolls_contract_nli`` ->
  classification (the input, the label the output: Entailment / Contradiction / Not mentioned);
  ``scrolls_gov_report``, ``scrolls_summ_screen_fd`` and ``scrolls_qmsum`` are summarization, which no
  longctx task trains (an encoder has no generation head): refused in one sentence.

Splits (``assemble``): train, dev and test as published. A published set without a labelled test split
(TriviaQA, HotpotQA, SQuAD, SCROLLS and QuALITY keep their test answers hidden), or a user's train + dev
files: the published dev split becomes the test split and a new dev split is carved from train by
document (10%); train alone: 80 / 10 / 10 by document. The log says which.

Loading by hub name (needs network; never run by tests or default commands): ``datasets.load_dataset(
"trivia_qa", "rc")``, ``("hotpot_qa", "distractor")``, ``("allenai/qasper")``, ``("deepmind/narrativeqa")``,
``("tau/scrolls", "quality")`` ..., then ``.save_to_disk(DIR)`` and ``task.dataset=DIR``
(``download_to_disk`` below does both).
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

from longctx.errors import LongctxError

SPLIT_NAMES = {"train": "train", "training": "train", "validation": "dev", "dev": "dev", "val": "dev",
               "valid": "dev", "test": "test", "testing": "test"}
FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow")


class Unlabelled(Exception):
    """A row without its answer (a published test split): the split may be unlabelled."""


class Dropped(Exception):
    """A row this task cannot learn from (a free-form answer not in the document ...): counted and dropped."""


# ---------------------------------------------------------------- reading
def _need_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise LongctxError(f"{what} needs the 'datasets' package, which is not installed: pip install datasets "
                           "(a dependency of longctx-toolkit: reinstalling longctx-toolkit installs it)") from None
    return datasets


def _split_of(path: Path, root: Path) -> str | None:
    """The split a file holds, from its name's first word or its folders' names."""
    words = re.split(r"[^a-z]+", path.stem.lower())
    for w in words:
        if w in SPLIT_NAMES:
            return SPLIT_NAMES[w]
    for part in reversed(path.relative_to(root).parts[:-1]):
        if part.lower() in SPLIT_NAMES:
            return SPLIT_NAMES[part.lower()]
    return None


def read_dataset(path: str | Path) -> dict[str, list[dict]]:
    """{split: rows} of ``task.dataset``: a ``save_to_disk`` folder, a folder of data files, or one file."""
    from longctx.tasks.files import read_records

    p = Path(path).expanduser()
    if not p.exists():
        raise LongctxError(f"task.dataset {path} does not exist; give a folder saved by datasets' save_to_disk, "
                           "a folder of Parquet / JSON / CSV files or one such file")
    if p.is_file():
        return {"train": read_records(p, "task.dataset")}
    if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
        datasets = _need_datasets(f"task.dataset {path} (a folder saved by datasets' save_to_disk)")
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - any failure means the folder cannot be read
            raise LongctxError(f"task.dataset {path} could not be read by datasets.load_from_disk "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        parts = dict(ds) if isinstance(ds, dict) or hasattr(ds, "keys") else {"train": ds}
        out: dict[str, list[dict]] = {}
        for name, d in parts.items():
            split = SPLIT_NAMES.get(str(name).lower())
            if split is None:
                raise LongctxError(f"task.dataset {path} has a split named {name!r}; name the splits train, "
                                   "validation (or dev) and test")
            out.setdefault(split, []).extend(dict(r) for r in d)
        return out
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FILE_SUFFIXES
                   and not f.name.startswith(".") and f.name not in ("dataset_info.json", "state.json"))
    if not files:
        raise LongctxError(f"task.dataset {path} is a folder without Parquet, JSON, JSON lines, CSV or Arrow files "
                           "and not one saved by datasets' save_to_disk")
    if len(files) == 1 and _split_of(files[0], p) is None:
        return {"train": read_records(files[0], "task.dataset")}
    out = {}
    for f in files:
        split = _split_of(f, p)
        if split is None:
            raise LongctxError(f"task.dataset file {f} names no split (train, validation / dev or test in its name "
                               "or its folder's); rename it or move it into a train / validation / test folder")
        out.setdefault(split, []).extend(read_records(f, "task.dataset"))
    return out


def download_to_disk(hub_name: str, config: str | None, out: str | Path) -> Path:
    """For users with network access: ``datasets.load_dataset(hub_name, config)`` saved to ``out``, which
    ``task.dataset=OUT`` then reads offline. Never called by tests or default commands."""
    datasets = _need_datasets("downloading a dataset")
    ds = datasets.load_dataset(hub_name, config) if config else datasets.load_dataset(hub_name)
    ds.save_to_disk(str(out))
    return Path(out)


# ---------------------------------------------------------------- field access
def _records(x) -> list[dict]:
    """A sequence of records in either of the forms readers give: a list of dicts, or a dict of lists
    (``datasets``' form of a sequence of structs)."""
    if x is None:
        return []
    if isinstance(x, dict):
        keys = list(x)
        n = {len(v) for v in x.values() if isinstance(v, list)}
        if len(n) == 1 and all(isinstance(v, list) for v in x.values()):
            return [{k: x[k][i] for k in keys} for i in range(n.pop())]
        return [x]
    return list(x)


def _get(row, dotted: str, where: str, schema: str, allow_none: bool = False):
    """A required field (``a.b``: nested); missing or null (a JSON reader's missing key) is one sentence."""
    cur = row
    keys = dotted.split(".")
    for i, key in enumerate(keys):
        if not isinstance(cur, dict) or key not in cur or (cur[key] is None and not (allow_none and i == len(keys) - 1)):
            have = ", ".join(map(str, cur)) if isinstance(cur, dict) else type(cur).__name__
            raise LongctxError(f"{where} has no field '{'.'.join(dotted.split('.')[:i + 1])}' of the {schema} schema "
                               f"(it has: {have}); check task.schema or the file")
        cur = cur[key]
    return cur


def _find(context: str, answer: str) -> tuple[str, int] | None:
    """(text as the context spells it, start) of the answer's first occurrence as whole words, exact
    case first, then ignoring case."""
    a = answer.strip()
    if not a:
        return None
    pat = (r"(?<!\w)" if a[0].isalnum() else "") + re.escape(a) + (r"(?!\w)" if a[-1].isalnum() else "")
    for flags in (0, re.IGNORECASE):
        m = re.search(pat, context, flags)
        if m:
            return m.group(0), m.start()
    return None


def _qa(id_, doc, question, context, candidates, no_span: str) -> dict:
    texts, starts = [], []
    for c in candidates:
        if not isinstance(c, str):
            continue
        hit = _find(context, c)
        if hit and hit[0] not in texts:
            texts.append(hit[0])
            starts.append(hit[1])
    if not texts:
        raise Dropped(no_span)
    return {"id": str(id_), "title": str(doc), "question": str(question), "context": context,
            "answers": {"text": texts, "answer_start": starts}}


# ---------------------------------------------------------------- converters: row -> records
def _squad(row, where):
    return [row]


def _triviaqa(row, where):
    s = "triviaqa"
    q, qid = _get(row, "question", where, s), _get(row, "question_id", where, s)
    pages = _get(row, "entity_pages", where, s)
    results = row.get("search_results") or {}
    wiki = pages.get("wiki_context", []) if isinstance(pages, dict) else [p.get("wiki_context", "") for p in pages]
    web = results.get("search_context", []) if isinstance(results, dict) else [r.get("search_context", "") for r in results]
    context = "\n\n".join(t for t in [*wiki, *web] if t)
    ans = _get(row, "answer", where, s, allow_none=True)
    if not isinstance(ans, dict) or not (ans.get("value") or ans.get("aliases")):
        raise Unlabelled()
    cands = [ans.get("value"), *(ans.get("aliases") or []), *(ans.get("normalized_aliases") or [])]
    return [_qa(qid, qid, q, context, cands, "no answer alias occurs in the document")]


def _hotpotqa(row, where):
    s = "hotpotqa"
    q, qid = _get(row, "question", where, s), _get(row, "id", where, s)
    answer = _get(row, "answer", where, s, allow_none=True)
    ctx = _records(_get(row, "context", where, s))
    paras, sent_spans, pos = [], {}, 0
    for p in ctx:
        title, sents = p.get("title"), p.get("sentences") or []
        head = f"{title}: "
        text = head
        off = pos + len(head)
        for j, sent in enumerate(sents):
            sent_spans[(title, j)] = (off, off + len(sent))
            text += sent
            off += len(sent)
        paras.append(text)
        pos += len(text) + 2
    context = "\n\n".join(paras)
    if not answer:
        raise Unlabelled()
    if str(answer).strip().lower() in ("yes", "no"):
        raise Dropped("yes / no answer (not a span)")
    for sf in _records(row.get("supporting_facts")):
        span = sent_spans.get((sf.get("title"), sf.get("sent_id")))
        if span:
            hit = _find(context[span[0]:span[1]], answer)
            if hit:
                return [{"id": str(qid), "title": str(qid), "question": q, "context": context,
                         "answers": {"text": [hit[0]], "answer_start": [span[0] + hit[1]]}}]
    return [_qa(qid, qid, q, context, [answer], "the answer does not occur in the paragraphs")]


def _qasper(row, where):
    s = "qasper"
    pid, title, abstract = (_get(row, f, where, s) for f in ("id", "title", "abstract"))
    full = _records(_get(row, "full_text", where, s))
    parts = [str(title), str(abstract)]
    for sec in full:
        parts.append("\n".join([str(sec.get("section_name") or ""), *map(str, sec.get("paragraphs") or [])]).strip())
    context = "\n\n".join(p for p in parts if p)
    out, drops = [], []
    for i, qa in enumerate(_records(_get(row, "qas", where, s))):
        for f in ("question", "answers"):
            if f not in qa:
                raise LongctxError(f"{where} has no field 'qas.{f}' of the qasper schema (it has: {', '.join(qa)}); "
                                   "check task.schema or the file")
        spans = []
        for ann in _records(qa["answers"]):
            for a in _records(ann.get("answer") if isinstance(ann, dict) and "answer" in ann else ann):
                spans += [x for x in (a.get("extractive_spans") or []) if x]
        try:
            out.append(_qa(qa.get("question_id") or f"{pid}:{i}", pid, qa["question"], context, spans,
                           "no extractive answer span (free-form, yes / no or unanswerable)"))
        except Dropped as d:
            drops.append(str(d))
    return out, drops


def _narrativeqa(row, where):
    s = "narrativeqa"
    doc = _get(row, "document", where, s)
    q = _get(row, "question", where, s)
    q = q.get("text") if isinstance(q, dict) else q
    context = doc.get("text") or (doc.get("summary") or {}).get("text") or ""
    answers = [a.get("text") if isinstance(a, dict) else a for a in _records(_get(row, "answers", where, s))]
    qid = hashlib.sha256(f"{doc.get('id')}\0{q}".encode()).hexdigest()[:16]
    return [_qa(qid, doc.get("id"), q, context, answers, "a free-form answer that does not occur in the story")]


def _mc(id_, doc, question, context, options, label, where) -> dict:
    if not isinstance(options, list) or len(options) < 2:
        raise LongctxError(f"{where}: 'options' must be a list of at least two answers, got {options!r:.80}")
    return {"id": str(id_), "doc": str(doc), "question": str(question), "context": str(context),
            "options": [str(o) for o in options], "label": label}


def _quality(row, where):
    s = "quality"
    article = _get(row, "article", where, s)
    doc = row.get("article_id") or row.get("set_unique_id") or hashlib.sha256(str(article).encode()).hexdigest()[:16]
    nested = "questions" in row
    qs = _records(row["questions"]) if nested else [row]
    out, drops = [], []
    for i, q in enumerate(qs):
        for f in ("question", "options"):
            if f not in q:
                raise LongctxError(f"{where} has no field '{'questions.' if nested else ''}{f}' of the quality schema "
                                   f"(it has: {', '.join(map(str, q))}); check task.schema or the file")
        gold = q.get("gold_label")
        if gold is None:
            drops.append("unlabelled")
            continue
        if not (isinstance(gold, int) and 1 <= gold <= len(q["options"])):
            raise LongctxError(f"{where}: gold_label {gold!r} is not an option number 1..{len(q['options'])} "
                               "(QuALITY numbers its options from 1)")
        out.append(_mc(q.get("question_unique_id") or f"{doc}:{i}", doc, q["question"], article, list(q["options"]),
                       gold - 1, where))
    if not out and drops:
        raise Unlabelled()
    return out, drops


def _scrolls_split(row, where, s):
    text, output = _get(row, "input", where, s), _get(row, "output", where, s, allow_none=True)
    cut = text.find("\n\n")
    if cut < 0:
        raise LongctxError(f"{where}: the {s} input has no blank line between the query and the document; "
                           "check task.schema")
    return text[:cut].strip(), text[cut + 2:].strip(), output


def _scrolls_qa(name):
    def conv(row, where):
        q, doc, output = _scrolls_split(row, where, name)
        if not output:
            raise Unlabelled()
        id_ = _get(row, "id", where, name)
        return [_qa(id_, id_, q, doc, [output], "a free-form answer that does not occur in the document")]
    return conv


def _scrolls_quality(row, where):
    s = "scrolls_quality"
    text, output, id_ = _get(row, "input", where, s), _get(row, "output", where, s, allow_none=True), _get(row, "id", where, s)
    m = re.search(r"\(A\)(.*?)\(B\)(.*?)\(C\)(.*?)\(D\)(.*?)\n\s*\n", text, re.S)
    if not m:
        raise LongctxError(f"{where}: the scrolls_quality input has no options (A) ... (D) before the article; "
                           "check task.schema")
    options = [g.strip() for g in m.groups()]
    if not output:
        raise Unlabelled()
    out = re.sub(r"^\(?[A-D]\)\s*", "", output.strip())
    if out not in options:
        raise Dropped("the output is none of the options")
    return [_mc(id_, id_, text[:m.start()].strip(), text[m.end():].strip(), options, options.index(out), where)]


def _scrolls_nli(row, where):
    s = "scrolls_contract_nli"
    text, output = _get(row, "input", where, s), _get(row, "output", where, s, allow_none=True)
    if not output:
        raise Unlabelled()
    return [{"text": text, "label": str(output).strip(), "doc": str(row.get("id"))}]


def _summarization(name):
    def conv(row, where):
        raise LongctxError(f"task.schema={name} is a summarization set, which no longctx task trains (an encoder has "
                           "no generation head); use a QA, multiple-choice or classification schema")
    return conv


# name -> (task, converter, key of the document a record belongs to)
SCHEMAS = {
    "squad": ("qa", _squad),
    "triviaqa": ("qa", _triviaqa),
    "hotpotqa": ("qa", _hotpotqa),
    "qasper": ("qa", _qasper),
    "narrativeqa": ("qa", _narrativeqa),
    "quality": ("multiple_choice", _quality),
    "scrolls_qasper": ("qa", _scrolls_qa("scrolls_qasper")),
    "scrolls_narrative_qa": ("qa", _scrolls_qa("scrolls_narrative_qa")),
    "scrolls_quality": ("multiple_choice", _scrolls_quality),
    "scrolls_contract_nli": ("classification", _scrolls_nli),
    "scrolls_gov_report": (None, _summarization("scrolls_gov_report")),
    "scrolls_summ_screen_fd": (None, _summarization("scrolls_summ_screen_fd")),
    "scrolls_qmsum": (None, _summarization("scrolls_qmsum")),
}
TASK_HINT = {"qa": "extractive QA (--task qa)", "multiple_choice": "multiple choice (--task multiple_choice)",
             "classification": "classification (--task classification)"}


def check_schema(schema: str | None, task: str) -> None:
    if schema is None:
        return
    if schema not in SCHEMAS:
        raise LongctxError(f"task.schema={schema} is unknown; use one of {', '.join(SCHEMAS)}")
    kind, conv = SCHEMAS[schema]
    if kind is None:
        conv({}, "")
    if kind != task:
        raise LongctxError(f"task.schema={schema} is {TASK_HINT[kind]}, not task {task!r}; run it with --task {kind}")


def convert(rows: list[dict], schema: str | None, what: str) -> tuple[list[dict], Counter, bool]:
    """(records, dropped reasons, unlabelled) of one split's rows in ``schema`` (None: rows as they are);
    unlabelled: every row lacked its answer (a published test split)."""
    if schema is None:
        return rows, Counter(), False
    conv = SCHEMAS[schema][1]
    out, dropped, unlabelled = [], Counter(), 0
    for i, row in enumerate(rows):
        where = f"{what} row {i + 1}"
        if not isinstance(row, dict):
            raise LongctxError(f"{where} is not a record ({type(row).__name__}); check the file")
        try:
            got = conv(row, where)
        except Dropped as d:
            dropped[str(d)] += 1
            continue
        except Unlabelled:
            unlabelled += 1
            continue
        if isinstance(got, tuple):
            got, drops = got
            dropped.update(d for d in drops if d != "unlabelled")
        out.extend(got)
    if schema.startswith("scrolls_") and SCHEMAS[schema][0] == "qa":
        out = _merge_by_id(out)
    return out, dropped, bool(rows) and unlabelled == len(rows)


def _merge_by_id(records: list[dict]) -> list[dict]:
    """SCROLLS gives a question with several references as several rows of one id: one record, every
    reference a gold answer."""
    by: dict[str, dict] = {}
    for r in records:
        if r["id"] not in by:
            by[r["id"]] = r
            continue
        a = by[r["id"]]["answers"]
        for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            if t not in a["text"]:
                a["text"].append(t)
                a["answer_start"].append(s)
    return list(by.values())


def doc_key(record: dict) -> str:
    """The document a record belongs to, for carving splits by document."""
    for k in ("title", "doc"):
        if record.get(k) not in (None, ""):
            return str(record[k])
    for k in ("context", "text", "texts"):
        if record.get(k) is not None:
            return hashlib.sha256(json.dumps(record[k], sort_keys=True).encode()).hexdigest()
    return json.dumps(record, sort_keys=True, default=str)


def assemble(raw: dict[str, list[dict]], seed: int, notes: list[str], source: str) -> dict[str, list[dict]]:
    """train / dev / test from the splits a source has (see the module's docstring)."""
    from longctx.tasks.common import split_by_document

    if "train" not in raw:
        raise LongctxError(f"{source} has no training split; name a file or folder train (or give task.train_file)")
    out = dict(raw)
    if "dev" in out and "test" not in out:
        out["test"] = out.pop("dev")
        carved = split_by_document(out["train"], doc_key, seed, (0.9, 0.1, 0.0))
        out["train"], out["dev"] = carved["train"], carved["dev"]
        notes.append(f"{source} has train and dev but no labelled test split: its dev split ({len(out['test'])} "
                     f"examples) is the test split, and a dev split of {len(out['dev'])} examples is carved from train "
                     "by document (10%)")
    elif "test" in out and "dev" not in out:
        carved = split_by_document(out["train"], doc_key, seed, (0.9, 0.1, 0.0))
        out["train"], out["dev"] = carved["train"], carved["dev"]
        notes.append(f"{source} has no dev split: {len(out['dev'])} examples carved from train by document (10%)")
    elif "dev" not in out and "test" not in out:
        carved = split_by_document(out["train"], doc_key, seed)
        out = carved
        notes.append(f"{source} has one split: train / dev / test of {len(out['train'])} / {len(out['dev'])} / "
                     f"{len(out['test'])} examples carved from it by document (80 / 10 / 10%)")
    return out


def parse_answers_string(s: str):
    """``answers`` as a CSV holds it: JSON, a Python literal, or ``datasets``' export (``{'text':
    array(['x'], dtype=object), 'answer_start': array([3])}``); None when it is none of these."""
    try:
        return json.loads(s)
    except (json.JSONDecodeError, TypeError):
        pass
    try:
        return ast.literal_eval(re.sub(r"array\((\[.*?\])(?:,\s*dtype=[\w<>]+)?\)", r"\1", s, flags=re.S))
    except (ValueError, SyntaxError):
        return None


def say(notes: list[str]) -> None:
    for n in notes:
        print(n, file=sys.stderr, flush=True)
