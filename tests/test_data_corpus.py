"""Corpora: the pydoc corpus built from the installed Python, the file formats, the split, and the user errors."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longctx.corpora import default_corpus
from longctx.data.corpus import corpus_fingerprint, load_documents, split_documents
from longctx.errors import LongctxError


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build the pydoc corpus from scratch into a private cache (as on a fresh machine)."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("LONGCTX_CACHE", str(cache))
    mp.setenv("LONGCTX_TEST_SECRET", "s3cr3t-value-from-the-environment")
    docs = load_documents("pydoc")
    yield cache, docs
    mp.undo()


@pytest.mark.slow
def test_pydoc_corpus_is_real_prose_with_headings(built):
    cache, docs = built
    text = sum(len(d["text"]) for d in docs)
    assert len(docs) > 100 and text > 1_000_000, (len(docs), text)
    ids = [d["id"] for d in docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {"json", "os", "collections", "re"} <= set(ids)
    assert not {"tkinter", "turtle", "antigravity", "this", "idlelib"} & set(ids)
    heads = {d["text"][s["start"]:s["end"]] for d in docs for s in d["structure"] if s["kind"] == "section"}
    assert {"NAME", "DESCRIPTION", "CLASSES", "FUNCTIONS", "DATA"} <= heads
    assert "FILE" not in heads  # machine-specific section dropped
    js = next(d for d in docs if d["id"] == "json")
    spans = [js["text"][s["start"]:s["end"]] for s in js["structure"]]
    assert spans[0] == "Python Library Documentation: package json" and js["structure"][0]["kind"] == "title"
    assert "FUNCTIONS" in spans and "dumps(obj" in js["text"]
    for s in js["structure"]:  # a heading is a whole line at column 0
        assert s["start"] == 0 or js["text"][s["start"] - 1] == "\n"
        assert js["text"][s["end"]] == "\n"


def test_pydoc_corpus_leaks_nothing_about_this_machine(built):
    _, docs = built
    everything = "".join(d["text"] for d in docs)
    assert "s3cr3t-value" not in everything  # children run with an empty environment (os.environ is rendered)
    source_folder = str(default_corpus.Path(default_corpus.__file__).resolve().parents[2])  # in sys.orig_argv
    for secret in [str(default_corpus.Path.home()), default_corpus.sys.prefix, source_folder, " at 0x7f", "handle 7f"]:
        if len(secret) > 1:
            assert secret not in everything, secret


def test_pydoc_corpus_is_cached_atomically_and_reloads_identically(built, monkeypatch):
    cache, docs = built
    files = list((cache / "default_corpus").iterdir())
    assert [f.name for f in files] == [default_corpus.cache_path().name]  # no temporary left behind

    def no_rebuild():
        raise AssertionError("the cached corpus was rebuilt instead of loaded")
    monkeypatch.setattr(default_corpus, "build_pydoc_corpus", no_rebuild)
    again = load_documents("pydoc")
    assert again == docs


def test_folder_jsonl_json_parquet_arrow_give_the_same_documents(tmp_path):
    docs = [{"id": "a.txt", "text": "First document.\nWith two lines."},
            {"id": "b.md", "text": "# Title\n\nSecond, ünïcode ✓."},
            {"id": "sub/c.txt", "text": "Third, in a subfolder."}]
    folder = tmp_path / "folder"
    for d in docs:
        (folder / d["id"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / d["id"]).write_text(d["text"], encoding="utf-8")
    (folder / "ignored.bin").write_bytes(b"\x00\xff")
    (folder / "empty.txt").write_text("  \n")  # empty documents are skipped
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs) + "\n", encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps(docs), encoding="utf-8")
    table = pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]})
    pq.write_table(table, tmp_path / "c.parquet")
    with pa.ipc.new_stream(str(tmp_path / "c.arrow"), table.schema) as w:
        w.write_table(table)
    for source in [folder, tmp_path / "c.jsonl", tmp_path / "c.json", tmp_path / "c.parquet", tmp_path / "c.arrow"]:
        assert load_documents(source) == docs, source


def test_jsonl_keeps_structure_and_custom_text_field(tmp_path):
    rec = {"id": "p1", "title": "On Things", "body": "On Things\n\n1 Intro\nText.",
           "structure": [{"kind": "title", "level": 0, "start": 0, "end": 9}, {"kind": "section", "level": 1, "start": 11, "end": 18}]}
    (tmp_path / "s.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({"body": "no id here"}) + "\n")
    docs = load_documents(tmp_path / "s.jsonl", text_field="body")
    assert docs[0] == {"id": "p1", "text": rec["body"], "structure": rec["structure"], "title": "On Things"}
    assert docs[1]["id"].endswith("s.jsonl:2") and docs[1]["text"] == "no id here"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in rec.items() if k != "title"}]), tmp_path / "s.parquet")
    assert load_documents(tmp_path / "s.parquet", text_field="body")[0]["structure"] == rec["structure"]


def test_split_is_deterministic_disjoint_and_never_empty():
    docs = [{"id": f"doc{i}", "text": f"text {i}"} for i in range(400)]
    train, valid = split_documents(docs, 0.1, seed=3)
    assert split_documents(docs, 0.1, seed=3) == (train, valid)
    ids_t, ids_v = {d["id"] for d in train}, {d["id"] for d in valid}
    assert not ids_t & ids_v and len(ids_t | ids_v) == 400
    assert 20 <= len(valid) <= 65
    assert [d["id"] for d in train] == [d["id"] for d in docs if d["id"] in ids_t]  # order kept
    assert {d["id"] for d in split_documents(docs, 0.1, seed=4)[1]} != ids_v
    # adding documents never moves existing ones
    _, valid_more = split_documents(docs + [{"id": f"new{i}", "text": "x"} for i in range(50)], 0.1, seed=3)
    assert ids_v <= {d["id"] for d in valid_more}
    for n in (2, 3):
        t, v = split_documents(docs[:n], 0.01, seed=0)
        assert t and v
        t, v = split_documents(docs[:n], 0.99, seed=0)
        assert t and v
    assert split_documents(docs[:5], 0.0, 0)[1] == []
    assert corpus_fingerprint(train) != corpus_fingerprint(valid)
    assert corpus_fingerprint(docs) == corpus_fingerprint([dict(d) for d in docs])


@pytest.mark.parametrize("case", ["missing", "empty_folder", "all_empty", "unknown", "no_field", "bad_line",
                                  "not_object", "parquet_column", "bad_fraction", "empty_jsonl"])
def test_user_errors_are_one_clear_sentence(tmp_path, case):
    p = tmp_path / "x.jsonl"
    kwargs = {}
    if case == "missing":
        source, expect = tmp_path / "nope", "does not exist"
    elif case == "empty_folder":
        (tmp_path / "d").mkdir()
        source, expect = tmp_path / "d", "holds no .txt"
    elif case == "all_empty":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "a.txt").write_text("\n \n")
        source, expect = tmp_path / "d", "has no documents with text"
    elif case == "unknown":
        (tmp_path / "c.csv").write_text("text\nhello\n")
        source, expect = tmp_path / "c.csv", "unknown format '.csv'"
    elif case == "no_field":
        p.write_text(json.dumps({"content": "hello"}) + "\n")
        source, expect = p, "no field 'text' (fields: content)"
    elif case == "bad_line":
        p.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
        source, expect = p, "line 2 is not valid JSON"
    elif case == "not_object":
        p.write_text("[1, 2]\n")
        source, expect = p, "is not a JSON object"
    elif case == "parquet_column":
        pq.write_table(pa.table({"body": ["hello"]}), tmp_path / "c.parquet")
        source, expect = tmp_path / "c.parquet", "has no column 'text' (columns: body)"
    elif case == "empty_jsonl":
        p.write_text("\n")
        source, expect = p, "has no documents with text"
    else:
        with pytest.raises(LongctxError, match="valid_fraction 1.5 is outside"):
            split_documents([{"id": "a", "text": "b"}], 1.5, 0)
        return
    with pytest.raises(LongctxError) as e:
        load_documents(source, **kwargs)
    msg = str(e.value)
    assert expect in msg and str(source) in msg and "\n" not in msg and msg.endswith(".")
