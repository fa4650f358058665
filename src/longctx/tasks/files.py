"""Users' task data, read from local files with ``datasets``: JSON lines, JSON, CSV, Parquet, Arrow.

``read_records(path)`` returns the file's rows as plain dicts. The official SQuAD layout
(``{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}``) is flattened to
one row per question, so SQuAD v1.1 files and their TriviaQA / HotpotQA conversions load as they are.
Nothing is downloaded: ``datasets`` only parses the given file.
"""
from __future__ import annotations

import json
from pathlib import Path

from longctx.errors import LongctxError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def read_records(path: str | Path, what: str = "task data") -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LongctxError(f"{what} file {path} does not exist; give a .jsonl, .json, .csv or .parquet file")
    suffix = p.suffix.lower()
    if suffix not in BUILDERS:
        raise LongctxError(f"{what} file {path} has an unknown format ({suffix or 'no suffix'}); use .jsonl, "
                           ".json, .csv, .parquet or .arrow")
    if suffix in (".jsonl", ".json", ".csv"):
        raw = p.read_bytes()
        if not raw.strip():
            return []  # empty: the caller names the empty split
        _check_utf8(raw, what, path)
    if suffix == ".json":
        nested = _squad_nested(p, what, path)
        if nested is not None:
            return nested
    import datasets  # here: slow to import, only for data-set folders

    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        ds = datasets.load_dataset(BUILDERS[suffix], data_files=[str(p.resolve())], split="train")
    except Exception as e:  # noqa: BLE001 - the library's many error types all mean "cannot read it"
        first = str(e).splitlines()[0] if str(e) else ""
        raise LongctxError(f"{what} file {path} could not be read as {BUILDERS[suffix]} ({type(e).__name__}: "
                           f"{first}); check the file") from None
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()
    return [dict(r) for r in ds]


def _check_utf8(raw: bytes, what: str, path) -> None:
    """Text formats must be UTF-8: pyarrow takes other bytes as they are and fails on reading the row."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise LongctxError(f"{what} file {path} is not valid UTF-8 (byte {raw[e.start]:#04x} on line {line}); "
                           "save it as UTF-8") from None


def _squad_nested(p: Path, what: str, path) -> list[dict] | None:
    """The official SQuAD layout flattened, or None when the file is not in it."""
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # JSON lines, or broken: datasets reports it
    if not (isinstance(raw, dict) and isinstance(raw.get("data"), list)):
        return None
    if raw["data"] and not any(isinstance(a, dict) and "paragraphs" in a for a in raw["data"]):
        raise LongctxError(f"{what} file {path} holds {{\"data\": [...]}}, the SQuAD layout, but none of its "
                           "entries has 'paragraphs'; give one record per row as JSON lines or a JSON list")
    rows = []
    for article in raw["data"]:
        for para in article.get("paragraphs", []) if isinstance(article, dict) else []:
            for qa in para.get("qas", []):
                rows.append({"id": qa.get("id"), "title": article.get("title"), "context": para.get("context"),
                             "question": qa.get("question"), "answers": qa.get("answers")})
    return rows


def read_user_splits(opts: dict, what: str, check, task: str | None = None, seed: int = 0) -> dict | None:
    """train / dev / test from the user's data, each row passed through ``check(row, where)``; None when
    none is given (the task then uses its built-in data). The data: ``task.dataset`` (a ``save_to_disk``
    folder, a folder of data files or one file) or ``task.{split}_file`` (train and dev at least), each
    row read in ``task.schema`` (``longctx.tasks.schemas``) when one is given. A missing dev or test split
    is made as ``schemas.assemble`` says, and the log says so."""
    from longctx.tasks import schemas

    splits = ("train", "dev", "test")
    dataset, schema = opts.get("dataset"), opts.get("schema")
    files = {s: opts[f"{s}_file"] for s in splits if opts.get(f"{s}_file")}
    if not dataset and not files:
        if schema:
            raise LongctxError(f"task.schema={schema} names the fields of your data, but no data is given; add "
                               "task.dataset=PATH (or task.train_file and task.dev_file)")
        return None
    schemas.check_schema(schema, task or what)
    if dataset and files:
        raise LongctxError("give task.dataset or task.train_file / dev_file / test_file, not both")
    if dataset:
        source = f"task.dataset {dataset}"
        raw = schemas.read_dataset(dataset)
    else:
        source = "task.train_file / dev_file"
        for s in ("train", "dev"):
            if s not in files:
                raise LongctxError(f"task.{s}_file is missing: with your own data give train_file, dev_file "
                                   "and test_file (or train_file and dev_file: the test split is then your dev file "
                                   "and a dev split is carved from train)")
        raw = {s: read_records(f, f"{what} {s}") for s, f in files.items()}
    notes: list[str] = []
    converted = {}
    for s, rows in raw.items():
        where = opts.get(f"{s}_file") or f"{source} {s}"
        records, dropped, unlabelled = schemas.convert(rows, schema, where)
        if unlabelled and s != "train":
            notes.append(f"{source}: the {s} split has no answers (a published test split); left out")
            continue
        if dropped:
            notes.append(f"{source}: {sum(dropped.values())} of the {s} split's questions dropped ("
                         + "; ".join(f"{n}: {r}" for r, n in dropped.most_common()) + f"), {len(records)} kept")
        converted[s] = records
    out = schemas.assemble(converted, seed, notes, source)
    checked = {}
    for s in splits:
        where = opts.get(f"{s}_file") if not dataset and s in files else f"{source} {s}"
        checked[s] = [check(r, f"{where} row {i + 1}") for i, r in enumerate(out.get(s, []))]
    schemas.say(notes)
    return checked
