"""Character-level LM corpora (text8, enwik8) as distributed, single texts split by position, and the
counts that bits per character / per byte divide by."""
from __future__ import annotations

import json
import random
import zipfile

import numpy as np
import pytest

from longctx.data.corpus import load_documents, split_corpus, split_documents
from longctx.data.packing import prepare_data
from longctx.data.tokenizer import ByteTokenizer, load_tokenizer
from longctx.errors import LongctxError

WORDS = ["the", "of", "anarchism", "originated", "as", "a", "term", "abuse", "first", "used", "against",
         "early", "working", "class", "radicals", "including", "diggers", "english", "revolution", "zero"]


def _text8_like(n_chars: int, seed: int = 0) -> bytes:
    """One line of lowercase letters and spaces, like text8 (which starts with a space, has no newline)."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        w = " " + rng.choice(WORDS)
        out.append(w)
        size += len(w)
    return "".join(out)[:n_chars].encode("ascii")


def _enwik8_like(n_bytes: int, seed: int = 0) -> bytes:
    """Wikipedia XML dump bytes, with multi-byte UTF-8 (enwik8 is the first 10^8 bytes of such a dump)."""
    rng = random.Random(seed)
    parts, size, i = [], 0, 0
    while size < n_bytes:
        title = rng.choice(["Zürich", "Ångström", "東京", "Anarchism", "Paris"])
        page = (f"  <page>\n    <title>{title} {i}</title>\n    <id>{i}</id>\n    <revision>\n      <text xml:space=\"preserve\">"
                f"'''{title}''' is a [[place]] &amp; {' '.join(rng.choice(WORDS) for _ in range(30))}.</text>\n"
                f"    </revision>\n  </page>\n").encode("utf-8")
        parts.append(page)
        size += len(page)
        i += 1
    return b"<mediawiki xmlns=\"http://www.mediawiki.org/xml/export-0.3/\">\n" + b"".join(parts)


def _standard_split(data: bytes, fraction: float = 0.05):
    """The split of the text8/enwik8 preparation scripts (transformer-xl prep_enwik8.py, Longformer):
    the last 2n bytes held out, n = 5% (5M of 100M): train, dev, test = data[:-2n], data[-2n:-n], data[-n:]."""
    n = round(len(data) * fraction)
    return data[:-2 * n], data[-2 * n:-n], data[-n:]


def _stream_bytes(stream, tok) -> bytes:
    ids = stream.ids.astype(np.int64)
    assert ids[-1] == tok.sep_id and (ids[:-1] < 256).all()  # one document, one separator at its end
    return ids[:-1].astype(np.uint8).tobytes()


@pytest.mark.parametrize("name", ["text8", "text8.zip"])
def test_text8_file_loads_with_the_standard_split(tmp_path, name):
    data = _text8_like(200_000)
    path = tmp_path / name
    if name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("text8", data)
    else:
        path.write_bytes(data)
    docs = load_documents(path)
    assert [d["id"] for d in docs] == ["text8"] and docs[0]["text"].encode() == data
    prep = prepare_data(path, "bytes", cache_dir=tmp_path / "cache")
    tok = prep.tokenizer
    train, dev, test = _standard_split(data)
    assert (len(train), len(dev), len(test)) == (180_000, 10_000, 10_000)  # 90/5/5
    assert _stream_bytes(prep.train, tok) == train
    assert _stream_bytes(prep.valid, tok) == dev
    assert _stream_bytes(prep.test, tok) == test
    assert (prep.train_docs, prep.valid_docs, prep.test_docs) == (1, 1, 1)
    # bits per character divides by the characters scored: here one byte token per character plus the
    # separator, so tokens / chars is exactly 1 and bpc = loss / ln 2
    assert prep.valid_chars == len(prep.valid) == 10_001 and prep.test_chars == len(prep.test) == 10_001


@pytest.mark.parametrize("name", ["enwik8", "enwik8.zip"])
def test_enwik8_file_loads_with_the_standard_byte_split(tmp_path, name):
    data = _enwik8_like(300_000)
    train, dev, test = _standard_split(data)
    # the standard cuts are byte positions; this file is built so they fall between characters
    # (checked here), then our split must give exactly the standard bytes
    for part in (dev, test):
        assert part[0] & 0xC0 != 0x80
    path = tmp_path / name
    if name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("enwik8", data)
    else:
        path.write_bytes(data)
    prep = prepare_data(path, "bytes", cache_dir=tmp_path / "cache")
    assert _stream_bytes(prep.train, prep.tokenizer) == train
    assert _stream_bytes(prep.valid, prep.tokenizer) == dev
    assert _stream_bytes(prep.test, prep.tokenizer) == test
    # enwik8's "bpc" is per byte: the byte count matches the token count; characters are fewer
    assert prep.valid_bytes == len(prep.valid) == len(dev) + 1
    assert prep.valid_chars == len(dev.decode("utf-8")) + 1 < prep.valid_bytes


def test_a_cut_inside_a_character_moves_to_its_start():
    text = "é" * 1000  # 2,000 bytes: the 90% cut (byte 1,800) is a character start, 5% more is 1,900
    for shift in ("", "a"):  # with one ASCII byte in front every even byte is a continuation byte
        doc = {"id": "d", "text": shift + text}
        train, valid, test = split_corpus([doc], 0.05, 0)
        pieces = [p[0]["text"] for p in (train, valid, test)]
        assert "".join(pieces) == doc["text"]
        n = len(doc["text"].encode())
        standard = [n - 2 * round(n * 0.05), n - round(n * 0.05)]
        got = [len(pieces[0].encode()), len(pieces[0].encode()) + len(pieces[1].encode())]
        assert all(0 <= s - g <= 3 for s, g in zip(standard, got))


def test_a_single_txt_file_trains_and_holds_out_its_end(tmp_path):
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    (tmp_path / "book.txt").write_text(text)
    prep = prepare_data(tmp_path / "book.txt", "bytes", valid_fraction=0.1, cache_dir=tmp_path / "cache")
    n = len(text)
    assert len(prep.valid) == round(n * 0.1) + 1 and len(prep.test) == round(n * 0.1) + 1
    assert _stream_bytes(prep.test, prep.tokenizer) == text[n - round(n * 0.1):].encode()
    # split_documents (no test part) gives the last valid_fraction to validation
    train, valid = split_documents([{"id": "b", "text": text}], 0.1, 0)
    assert valid[0]["text"] == text[n - round(n * 0.1):] and train[0]["text"] + valid[0]["text"] == text


def test_a_single_structured_document_keeps_its_spans_per_part():
    text = "Title here. " + "body " * 130 + "Across the cut " + "Results section. " + "more " * 10
    a, c = text.index("Results"), text.index("Across")
    doc = {"id": "p", "text": text, "structure": [{"kind": "title", "level": 0, "start": 0, "end": 10},
                                                  {"kind": "section", "level": 1, "start": c, "end": c + 14},
                                                  {"kind": "section", "level": 1, "start": a, "end": a + 7}]}
    cut = len(text) - round(len(text) * 0.1)
    assert c < cut < c + 14 < a
    train, valid, test = split_corpus([doc], 0.1, 0, test_fraction=0.0)
    assert test == []
    t, v = train[0], valid[0]
    assert t["text"] + v["text"] == text
    # a span across the cut is clipped to each side
    assert [t["text"][s["start"]:s["end"]] for s in t["structure"]] == ["Title here", text[c:cut]]
    assert [v["text"][s["start"]:s["end"]] for s in v["structure"]] == [text[cut:c + 14], "Results"]


def test_several_documents_get_a_test_part_only_when_asked_and_valid_does_not_move():
    docs = [{"id": f"doc{i}", "text": f"text {i}"} for i in range(400)]
    train, valid, test = split_corpus(docs, 0.1, 3)
    assert test == [] and (train, valid) == split_documents(docs, 0.1, 3)
    train2, valid2, test2 = split_corpus(docs, 0.1, 3, test_fraction=0.1)
    assert valid2 == valid and 20 <= len(test2) <= 65
    assert {d["id"] for d in train2} | {d["id"] for d in test2} == {d["id"] for d in train}
    assert not {d["id"] for d in train2} & {d["id"] for d in test2}


@pytest.mark.parametrize("case,match", [
    ("tiny", "too few"), ("two-member-zip", "exactly one"), ("bad-zip", "not a readable .zip"),
    ("fractions", "nothing to train on"),
])
def test_single_text_errors(tmp_path, case, match):
    with pytest.raises(LongctxError, match=match) as e:
        if case == "tiny":
            (tmp_path / "text8").write_bytes(b" ab")
            split_corpus(load_documents(tmp_path / "text8"), 0.05, 0)
        elif case == "two-member-zip":
            with zipfile.ZipFile(tmp_path / "c.zip", "w") as z:
                z.writestr("a", "x")
                z.writestr("b", "y")
            load_documents(tmp_path / "c.zip")
        elif case == "bad-zip":
            (tmp_path / "c.zip").write_bytes(b"not a zip")
            load_documents(tmp_path / "c.zip")
        else:
            split_corpus([{"id": "a", "text": "x" * 100}], 0.5, 0, test_fraction=0.5)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("structure", ["abc", 5, [{"kind": "section", "start": 0, "end": 999}],
                                       [{"kind": "section", "start": "0", "end": 3}], [["section", 0, 3]],
                                       [{"start": 0, "end": 3}], [{"kind": "title", "start": 4, "end": 2}]])
def test_a_bad_structure_in_a_jsonl_corpus_is_one_sentence(tmp_path, structure):
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "a", "text": "Some text here.", "structure": structure}) + "\n")
    with pytest.raises(LongctxError, match="structure") as e:
        load_documents(tmp_path / "c.jsonl")
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("spec", [{"train": "bpe", "vocab_size": -10}, {"train": "bpe", "vocab_size": "abc"},
                                  {"train": "bpe", "vocab_size": 8.5}, {"train": "wordpiece", "min_frequency": -1}])
def test_a_bad_vocab_size_is_one_sentence(spec):
    with pytest.raises(LongctxError, match="vocab_size|min_frequency"):
        load_tokenizer(spec, documents=[{"id": "a", "text": "some text"}])


def test_byte_fast_path_equals_the_offset_path():
    from longctx.data.packing import tokenize_documents

    docs = [{"id": "a", "text": "Zürich 東京 plain"}, {"id": "b", "text": "Ångström",
                                                        "structure": [{"kind": "title", "start": 0, "end": 3}]}]
    stream = tokenize_documents(docs, ByteTokenizer())
    want = []
    for d in docs:
        want += ByteTokenizer().encode(d["text"])[0] + [ByteTokenizer.sep_id]
    assert stream.ids.tolist() == want
    assert stream.heading.tolist() == [False] * (len(docs[0]["text"].encode()) + 1) + [True] * 4 + [False] * 7
