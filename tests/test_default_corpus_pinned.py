"""The default corpus is a snapshot shipped with longctx: the same documents on every machine and Python."""
import lzma
import sys

import pytest

from longctx.corpora import default_corpus
from longctx.data.corpus import corpus_fingerprint, corpus_identity, load_documents
from longctx.errors import LongctxError


def test_the_shipped_corpus_loads_and_matches_its_recorded_hash():
    docs = load_documents("default")
    assert len(docs) == 206 and sum(len(d["text"]) for d in docs) == 4_149_792
    assert corpus_fingerprint(docs) == default_corpus.SNAPSHOT_SHA256
    assert [d["id"] for d in docs] == sorted(d["id"] for d in docs)
    js = next(d for d in docs if d["id"] == "json")
    assert "dumps(obj" in js["text"] and js["structure"][0]["kind"] == "title"
    assert default_corpus.SNAPSHOT.stat().st_size < 1_500_000


def test_two_loads_are_identical_and_records_hold_only_id_text_structure():
    a, b = load_documents("default"), load_documents("default")
    assert a == b and a is not b
    assert {k for d in a for k in d} == {"id", "text", "structure"}


def test_loading_default_never_reads_the_installed_python(monkeypatch):
    def no_build():
        raise AssertionError("the default corpus was built from the installed Python")
    monkeypatch.setattr(default_corpus, "build_pydoc_corpus", no_build)
    monkeypatch.setattr(default_corpus, "load_pydoc_corpus", no_build)
    before = corpus_identity("default")
    monkeypatch.setattr(sys, "version_info", (3, 12, 9, "final", 0))
    monkeypatch.setattr(sys, "version", "3.12.9 (elsewhere)")
    after = corpus_identity("default")
    assert before == after
    assert after == {"name": "default", "sha256": default_corpus.SNAPSHOT_SHA256, "documents": 206,
                     "chars": 4_149_792, "source": default_corpus.SNAPSHOT_SOURCE}


def test_the_pydoc_corpus_is_still_built_from_the_installed_python(monkeypatch):
    built = [{"id": "m", "text": "Python Library Documentation: module m\n", "structure": []}]
    monkeypatch.setattr(default_corpus, "load_pydoc_corpus", lambda: built)
    identity = corpus_identity("pydoc")
    assert identity["documents"] == 1 and identity["sha256"] == corpus_fingerprint(built)
    assert "built on this machine" in identity["source"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "edit", "missing"])
def test_a_damaged_snapshot_is_one_sentence(tmp_path, monkeypatch, damage):
    raw = default_corpus.SNAPSHOT.read_bytes()
    bad = tmp_path / "pydoc-corpus-v1.jsonl.xz"
    if damage == "flip":
        bad.write_bytes(raw[:1000] + bytes([raw[1000] ^ 1]) + raw[1001:])
    elif damage == "truncate":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "edit":  # valid xz and JSON, one character of one document changed
        text = lzma.decompress(raw).decode("utf-8").replace("Serialize", "Serialise", 1)
        bad.write_bytes(lzma.compress(text.encode("utf-8")))
    monkeypatch.setattr(default_corpus, "SNAPSHOT", bad)
    with pytest.raises(LongctxError, match=r"^the built-in default corpus .* is missing or damaged .*; "
                                           r"reinstall longctx, or set data.corpus: pydoc .*\.$") as e:
        load_documents("default")
    assert "\n" not in str(e.value)
