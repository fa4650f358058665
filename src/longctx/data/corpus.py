"""Corpora: where documents come from, and the train/valid split.

``load_documents(source)`` returns a list of documents ``{"id": str, "text": str}``, plus
``"structure"`` (character spans of the title and headings, see ``longctx.data.structure``) and
``"title"`` when the source has them. ``source`` is one of:

- ``"default"``: the embedded corpus (Python standard library documentation rendered by pydoc,
  see ``longctx.data.default_corpus``), built and cached on first use;
- a folder: every ``.txt`` / ``.md`` file in it, recursively, sorted by relative path (id = that
  path); a folder with no text files but ``.parquet`` / ``.arrow`` / ``.jsonl`` files loads those;
- a ``.jsonl`` file (one JSON object per line) or ``.json`` file (a JSON array of objects, or JSON
  lines), e.g. ``structured.jsonl`` from ``longctx corpus arxiv``;
- a ``.parquet`` or ``.arrow`` file, read with the ``datasets`` library from the local file.

Records take their text from ``text_field`` and their id from ``"id"`` when present (else
``<file>:<line or row>``). Documents whose text is empty or only whitespace are skipped. Mistakes
(missing path, unknown format, missing field, broken JSON, nothing to train on) raise
``LongctxError`` with one sentence naming the input and what to do.

``split_documents(docs, valid_fraction, seed)`` splits by document, deterministically from
``(seed, id)`` alone, so adding documents never moves existing ones to the other side.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from longctx.errors import LongctxError

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".parquet", ".arrow")
JSON_SUFFIXES = (".jsonl", ".json")


def load_documents(source: str | Path, text_field: str = "text") -> list[dict]:
    """Load a corpus as ``[{"id", "text", ["structure", "title"]}, ...]`` in a fixed order."""
    if str(source) == "default":
        from longctx.data.default_corpus import load_default_corpus

        docs = load_default_corpus()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise LongctxError(f"corpus {source} does not exist; give a folder of .txt/.md files, a .jsonl, "
                               f".json, .parquet or .arrow file, or 'default' for the built-in corpus.")
        if path.is_dir():
            docs = _load_folder(path, text_field)
        else:
            docs = _load_file(path, text_field, name=str(source))
    docs = [d for d in docs if d["text"].strip()]
    if not docs:
        raise LongctxError(f"corpus {source} has no documents with text; check that it holds non-empty "
                           f"documents (and that the text field is '{text_field}').")
    return docs


def _load_folder(path: Path, text_field: str) -> list[dict]:
    files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES),
                   key=lambda p: p.relative_to(path).as_posix())
    if files:
        docs = []
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise LongctxError(f"corpus file {p} is not UTF-8 text (byte {e.start}); convert it to UTF-8 "
                                   f"or remove it from the folder.") from None
            docs.append({"id": p.relative_to(path).as_posix(), "text": text})
        return docs
    data = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES + (".jsonl",)),
                  key=lambda p: p.relative_to(path).as_posix())
    if not data:
        raise LongctxError(f"corpus folder {path} holds no .txt, .md, .jsonl, .parquet or .arrow files; "
                           f"put the documents there or point to the file that holds them.")
    docs = []
    for p in data:
        docs.extend(_load_file(p, text_field, name=p.relative_to(path).as_posix()))
    return docs


def _load_file(path: Path, text_field: str, name: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _load_json(path, text_field, name)
    if suffix in TABLE_SUFFIXES:
        return _load_table(path, text_field, name)
    if suffix in TEXT_SUFFIXES:
        return [{"id": path.name, "text": path.read_text(encoding="utf-8", errors="replace")}]
    raise LongctxError(f"corpus {path} has an unknown format '{path.suffix}'; use a folder of .txt/.md files "
                       f"or a .jsonl, .json, .parquet or .arrow file.")


def _load_json(path: Path, text_field: str, name: str) -> list[dict]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LongctxError(f"corpus {path} is not UTF-8 text; write it as UTF-8 JSON.") from None
    records: list[tuple[str, object]] = []
    if path.suffix.lower() == ".json" and raw.lstrip().startswith("["):
        try:
            array = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LongctxError(f"corpus {path} is not valid JSON (line {e.lineno}: {e.msg}); fix the file "
                               f"or write one JSON object per line as .jsonl.") from None
        records = [(f"{name}:{i}", r) for i, r in enumerate(array)]
    else:
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{name}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise LongctxError(f"corpus {path} line {lineno} is not valid JSON ({e.msg}); fix or remove "
                                   f"that line.") from None
    return [_record(r, where, text_field, path) for where, r in records]


def _load_table(path: Path, text_field: str, name: str) -> list[dict]:
    import datasets

    builder = "parquet" if path.suffix.lower() == ".parquet" else "arrow"
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        ds = datasets.load_dataset(builder, data_files=[str(path.resolve())], split="train")
    except Exception as e:  # noqa: BLE001 - the library's many error types all mean "cannot read it"
        raise LongctxError(f"corpus {path} could not be read as {builder} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); check that the file is a valid "
                           f"{builder} file.") from None
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()
    if text_field not in ds.column_names:
        raise LongctxError(f"corpus {path} has no column '{text_field}' (columns: {', '.join(ds.column_names)}); "
                           f"choose the text column with text_field.")
    return [_record(r, f"{name}:{i}", text_field, path) for i, r in enumerate(ds)]


def _record(r: object, where: str, text_field: str, path: Path) -> dict:
    if not isinstance(r, dict):
        raise LongctxError(f"corpus {path} record {where} is not a JSON object; write one object with a "
                           f"'{text_field}' field per document.")
    if text_field not in r:
        raise LongctxError(f"corpus {path} record {where} has no field '{text_field}' (fields: "
                           f"{', '.join(map(str, r)) or 'none'}); choose the text field with text_field.")
    text = r[text_field]
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise LongctxError(f"corpus {path} record {where} has a {type(text).__name__} in '{text_field}', "
                           f"not text; choose a text field.")
    doc = {"id": str(r["id"]) if r.get("id") is not None else where, "text": text}
    if r.get("structure"):
        doc["structure"] = [dict(s) for s in r["structure"]]
    if r.get("title"):
        doc["title"] = r["title"]
    return doc


def _unit_hash(seed: int, doc_id: str) -> float:
    h = hashlib.sha256(f"{seed}\0{doc_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_documents(docs: list[dict], valid_fraction: float = 0.05, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split into ``(train, valid)`` by document; order kept within each part.

    A document is held out when ``sha256(seed, id)`` falls below ``valid_fraction``, so the split
    depends only on the seed and the ids. With two or more documents and ``0 < valid_fraction < 1``
    both parts are non-empty (the document with the lowest / highest hash is moved if needed).
    ``valid_fraction=0`` gives an empty valid set.
    """
    if not 0 <= valid_fraction < 1:
        raise LongctxError(f"valid_fraction {valid_fraction} is outside [0, 1); use e.g. 0.05 for 5% of "
                           f"the documents held out.")
    if not docs:
        raise LongctxError("the corpus has no documents to split; give a corpus with at least one document.")
    h = [_unit_hash(seed, d["id"]) for d in docs]
    is_valid = [x < valid_fraction for x in h]
    if valid_fraction > 0 and len(docs) >= 2:
        if not any(is_valid):
            is_valid[min(range(len(docs)), key=h.__getitem__)] = True
        if all(is_valid):
            is_valid[max(range(len(docs)), key=h.__getitem__)] = False
    train = [d for d, v in zip(docs, is_valid) if not v]
    valid = [d for d, v in zip(docs, is_valid) if v]
    return train, valid


def corpus_fingerprint(docs: list[dict]) -> str:
    """A sha256 over ids, texts and structures: the cache key of anything derived from ``docs``."""
    h = hashlib.sha256()
    for d in docs:
        for part in (d["id"], d["text"], json.dumps(d.get("structure") or [], sort_keys=True)):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()
