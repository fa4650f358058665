"""Corpora: where documents come from, and the train/valid split.

``load_documents(source)`` returns a list of documents ``{"id": str, "text": str}``, plus
``"structure"`` (character spans of the title and headings, see ``longctx.data.structure``) and
``"title"`` when the source has them. ``source`` is one of:

- ``"default"``: the built-in corpus, a snapshot of the Python standard library documentation rendered
  by pydoc, shipped with longctx and checked by hash, the same on every machine (see
  ``longctx.corpora.default_corpus``);
- ``"pydoc"``: the same kind of corpus built from the installed Python (cached on first use), so it
  differs between Python versions;
- a folder: every ``.txt`` / ``.md`` file in it, recursively, sorted by relative path (id = that
  path); a folder with no text files but ``.parquet`` / ``.arrow`` / ``.jsonl`` files loads those;
- a ``.jsonl`` file (one JSON object per line) or ``.json`` file (a JSON array of objects, or JSON
  lines), e.g. ``structured.jsonl`` from ``longctx corpus arxiv``;
- a ``.parquet`` or ``.arrow`` file, read with the ``datasets`` library from the local file;
- a single text file: ``.txt``/``.md``, or a file without a suffix such as the character-level LM
  corpora as distributed (``text8``, ``enwik8``), or a ``.zip`` holding one such file (``text8.zip``,
  ``enwik8.zip``): one document (id = the file name).

Records take their text from ``text_field`` and their id from ``"id"`` when present (else
``<file>:<line or row>``). Documents whose text is empty or only whitespace are skipped. Mistakes
(missing path, unknown format, missing field, broken JSON, nothing to train on) raise
``LongctxError`` with one sentence naming the input and what to do.

``split_corpus(docs, valid_fraction, seed, test_fraction)`` returns ``(train, valid, test)``:

- several documents are split by document, deterministically from ``(seed, id)`` alone, so adding
  documents never moves existing ones to the other side; a document is held out for validation when
  its hash falls below ``valid_fraction``, for test when it falls in ``[valid_fraction,
  valid_fraction + test_fraction)``. ``test_fraction`` defaults to 0 here (no test set, the
  validation documents are the same as without one);
- a single document (one text file) is split by position: train is its start, validation the next
  ``valid_fraction`` and test the last ``test_fraction`` of it (default: ``valid_fraction`` again),
  measured in UTF-8 bytes, each cut moved back to the start of the character it falls in. With the
  default 0.05 this is the standard split of text8 and enwik8 (100M characters/bytes: the first 90M
  train, the next 5M dev, the last 5M test), and the same 90/5/5 proportions for smaller files.

``split_documents(docs, valid_fraction, seed)`` is ``split_corpus`` with no test set, as ``(train, valid)``.

``corpus_identity(source)`` says which corpus a run used, for its results: ``{"name", "sha256"
(corpus_fingerprint of the loaded documents), "documents", "chars", "source"}``.
"""
from __future__ import annotations

import hashlib
import json
import platform
import zipfile
from pathlib import Path

from longctx.corpora import default_corpus
from longctx.corpora.texdoc import texdoc_corpus
from longctx.errors import LongctxError

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".parquet", ".arrow")
JSON_SUFFIXES = (".jsonl", ".json")


def load_documents(source: str | Path, text_field: str = "text") -> list[dict]:
    """Load a corpus as ``[{"id", "text", ["structure", "title"]}, ...]`` in a fixed order."""
    if str(source) == "default":
        docs = default_corpus.load_default_corpus()
    elif str(source) == "pydoc":
        docs = default_corpus.load_pydoc_corpus()  # by attribute: tests replace it
    elif str(source) == "texdoc":  # StructFormer's corpus without arXiv sources: the installed LaTeX docs

        docs = _load_file(texdoc_corpus(), text_field, name="texdoc")
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise LongctxError(f"corpus {source} does not exist; give a folder of .txt/.md files, a .jsonl, "
                               f".json, .parquet or .arrow file, 'default' for the built-in corpus or 'pydoc' to build "
                               f"one from this Python's documentation.")
        if path.is_dir():
            docs = _load_folder(path, text_field)
        else:
            docs = _load_file(path, text_field, name=str(source))
    docs = [d for d in docs if d["text"].strip()]
    if not docs:
        raise LongctxError(f"corpus {source} has no documents with text; check that it holds non-empty "
                           f"documents (and that the text field is '{text_field}').")
    return docs


def corpus_identity(source: str | Path, text_field: str = "text") -> dict:
    """Which corpus ``source`` is: its name, ``corpus_fingerprint``, size and where it comes from."""
    docs = load_documents(source, text_field)
    if str(source) == "default":
        origin = default_corpus.SNAPSHOT_SOURCE
    elif str(source) == "pydoc":
        origin = f"pydoc of {platform.python_implementation()} {platform.python_version()}, built on this machine"
    elif str(source) == "texdoc":
        origin = "the installed LaTeX documentation, built on this machine"
    else:
        origin = "local files"
    return {"name": str(source), "sha256": corpus_fingerprint(docs), "documents": len(docs),
            "chars": sum(len(d["text"]) for d in docs), "source": origin}


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
    if suffix in TEXT_SUFFIXES or suffix == "":
        return [{"id": path.name, "text": path.read_bytes().decode("utf-8", errors="replace")}]
    if suffix == ".zip":
        return [_load_zip(path)]
    raise LongctxError(f"corpus {path} has an unknown format '{path.suffix}'; use a folder of .txt/.md files, "
                       f"a .jsonl, .json, .parquet or .arrow file, or one text file (.txt, no suffix, or .zip).")


def _load_zip(path: Path) -> dict:
    """The one file in a ``.zip`` (``text8.zip``, ``enwik8.zip`` as distributed) as one document."""

    try:
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            if len(members) != 1:
                raise LongctxError(f"corpus {path} holds {len(members)} files; a .zip corpus must hold exactly "
                                   f"one text file (as text8.zip and enwik8.zip do).")
            data = z.read(members[0])
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise LongctxError(f"corpus {path} is not a readable .zip file ({e}); check the download.") from None
    return {"id": members[0].filename, "text": data.decode("utf-8", errors="replace")}


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
    import datasets  # here: slow to import, only for table corpora

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
        doc["structure"] = _structure(r["structure"], len(text), where, path)
    if r.get("title"):
        doc["title"] = r["title"]
    return doc


def _structure(spans: object, n_chars: int, where: str, path: Path) -> list[dict]:
    """The record's ``structure`` checked: a list of ``{"kind": str, "start": int, "end": int, ...}``
    with ``0 <= start <= end <= len(text)``."""
    fix = ("write structure as a list of {\"kind\", \"level\", \"start\", \"end\"} character spans "
           "(as longctx corpus arxiv does), or leave it out.")
    if not isinstance(spans, list):
        raise LongctxError(f"corpus {path} record {where} has a {type(spans).__name__} as 'structure'; {fix}")
    out = []
    for i, s in enumerate(spans):
        ok = (isinstance(s, dict) and isinstance(s.get("kind"), str)
              and all(isinstance(s.get(k), int) and not isinstance(s.get(k), bool) for k in ("start", "end"))
              and 0 <= s["start"] <= s["end"] <= n_chars)
        if not ok:
            raise LongctxError(f"corpus {path} record {where} has a bad structure span {i} ({str(s)[:80]}); "
                               f"{fix}")
        out.append(dict(s))
    return out


def _unit_hash(seed: int, doc_id: str) -> float:
    h = hashlib.sha256(f"{seed}\0{doc_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_documents(docs: list[dict], valid_fraction: float = 0.05, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, valid)``: ``split_corpus`` without a test set."""
    train, valid, _ = split_corpus(docs, valid_fraction, seed, test_fraction=0.0)
    return train, valid


def split_corpus(docs: list[dict], valid_fraction: float = 0.05, seed: int = 0,
                 test_fraction: float | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Split into ``(train, valid, test)``, order kept within each part (the rules are in the module doc).

    ``test_fraction=None`` means 0 for several documents and ``valid_fraction`` for a single one.
    By document, with two or more documents and ``0 < valid_fraction < 1`` train and valid are both
    non-empty (the document with the lowest / highest hash is moved if needed); ``valid_fraction=0``
    gives an empty valid set.
    """
    if test_fraction is None:
        test_fraction = valid_fraction if len(docs) == 1 else 0.0
    for name, f in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise LongctxError(f"{name} {f} is outside [0, 1); use e.g. 0.05 for 5% of the corpus held out.")
    if valid_fraction + test_fraction >= 1:
        raise LongctxError(f"valid_fraction {valid_fraction} + test_fraction {test_fraction} leave nothing to "
                           f"train on; keep their sum below 1.")
    if not docs:
        raise LongctxError("the corpus has no documents to split; give a corpus with at least one document.")
    if len(docs) == 1:
        return split_by_position(docs[0], valid_fraction, test_fraction)
    h = [_unit_hash(seed, d["id"]) for d in docs]
    is_valid = [x < valid_fraction for x in h]
    is_test = [valid_fraction <= x < valid_fraction + test_fraction for x in h]
    if valid_fraction > 0:
        if not any(is_valid):
            k = min(range(len(docs)), key=h.__getitem__)
            is_valid[k], is_test[k] = True, False
        if all(v or t for v, t in zip(is_valid, is_test)):
            k = max(range(len(docs)), key=h.__getitem__)
            is_valid[k] = is_test[k] = False
    parts: tuple[list[dict], list[dict], list[dict]] = ([], [], [])
    for d, v, t in zip(docs, is_valid, is_test):
        parts[1 if v else 2 if t else 0].append(d)
    return parts


def _char_start(data: bytes, b: int) -> int:
    """``b`` moved back to the first byte of the UTF-8 character it falls in."""
    while 0 < b < len(data) and data[b] & 0xC0 == 0x80:
        b -= 1
    return b


def split_by_position(doc: dict, valid_fraction: float, test_fraction: float) -> tuple[list[dict], list[dict], list[dict]]:
    """One document cut into ``(train, valid, test)`` parts by UTF-8 byte position (see the module doc);
    a part of zero length is left out. Structure spans are clipped to each part and shifted."""
    text = doc["text"]
    data = text.encode("utf-8", "surrogatepass")
    n = len(data)
    n_test = round(n * test_fraction)
    n_valid = round(n * valid_fraction)
    if valid_fraction > 0 and (n_valid == 0 or n - n_valid - n_test <= 0):
        raise LongctxError(f"document {doc['id']} has {n} bytes, too few to hold out {valid_fraction:g} of it; "
                           f"give a longer text or several documents.")
    cuts = [0, _char_start(data, n - n_valid - n_test), _char_start(data, n - n_test), n]
    parts: tuple[list[dict], list[dict], list[dict]] = ([], [], [])
    char_at = 0
    for k, name in enumerate(("train", "valid", "test")):
        piece = data[cuts[k]:cuts[k + 1]].decode("utf-8", "surrogatepass")
        if piece:
            part = {**doc, "id": f"{doc['id']}[{name}]", "text": piece}
            if doc.get("structure"):
                part["structure"] = _clip_spans(doc["structure"], char_at, char_at + len(piece))
            parts[k].append(part)
        char_at += len(piece)
    return parts


def _clip_spans(spans: list[dict], a: int, b: int) -> list[dict]:
    """The spans that overlap characters ``[a, b)``, clipped to them and shifted to start at 0."""
    return [{**s, "start": max(s["start"], a) - a, "end": min(s["end"], b) - a}
            for s in spans if s["start"] < b and s["end"] > a]


def corpus_fingerprint(docs: list[dict]) -> str:
    """A sha256 over ids, texts and structures: the cache key of anything derived from ``docs``."""
    h = hashlib.sha256()
    for d in docs:
        for part in (d["id"], d["text"], json.dumps(d.get("structure") or [], sort_keys=True)):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()
