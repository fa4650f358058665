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


def read_user_splits(opts: dict, what: str, check) -> dict | None:
    """train / dev / test from the user's ``task.{split}_file`` options, each row passed through
    ``check(row, where)``; None when no file is given (the task then uses its built-in data)."""
    splits = ("train", "dev", "test")
    if not any(opts[f"{s}_file"] for s in splits):
        return None
    out = {}
    for s in splits:
        if not opts[f"{s}_file"]:
            raise LongctxError(f"task.{s}_file is missing: with your own data give train_file, dev_file "
                               "and test_file")
        rows = read_records(opts[f"{s}_file"], f"{what} {s}")
        out[s] = [check(r, f"{opts[f'{s}_file']} row {i + 1}") for i, r in enumerate(rows)]
    return out
