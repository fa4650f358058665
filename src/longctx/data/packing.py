"""Documents -> one token stream -> fixed-length blocks (RoBERTa's FULL-SENTENCES packing).

``tokenize_documents(docs, tokenizer)`` encodes the documents in order and concatenates them, each
followed by the tokenizer's separator (``sep_id``, the eos), into a ``TokenStream``: token ids, a
per-token ``heading`` flag (True on tokens overlapping a heading span of the document's
``structure``, as ``longctx.data.structure.heading_global_mask`` defines it; False for documents
without structure and for separators) and where each document starts. With ``cache_dir`` the
stream is saved as ``.npy`` files under ``<cache_dir>/<key>/`` (key = sha256 of corpus, tokenizer
and heading kinds), written to a temporary folder and renamed, so a second run and every variant of
a comparison load it instead of tokenizing again.

``PackedDataset(stream, seq_len)`` cuts the stream into consecutive blocks of ``seq_len`` tokens (a
block may span documents; the partial last block is dropped unless ``drop_last=False``). Items are
``{"input_ids": LongTensor[seq_len], "heading": BoolTensor[seq_len]}``. Blocks are views of the same
stream, so staged training packs the same stream at another length with no re-tokenizing.
``start_token=tok.cls_id`` begins every block with that token (then ``seq_len - 1`` stream tokens per
block), e.g. for a [CLS] that ``global_tokens: first`` makes global.

``prepare_data(source, tokenizer, ...)`` does the whole chain: load, split (``split_corpus``: by
document, or by position for a single text such as text8), load or train the tokenizer on the train
part, tokenize train, valid and test (cached). Default cache: ``longctx.paths.cache_root()``
(``tokens/`` and ``tokenizers/`` in it).

Bits per character: ``PreparedData.valid_chars`` counts the valid text's characters (code points)
plus one per document separator, as its token stream holds one separator token per document; so
``bpc = mean loss (nats per token) * len(valid) / valid_chars / ln 2``. With the byte tokenizer a
token is a UTF-8 byte: for ASCII text (text8) bytes and characters coincide; for enwik8, whose
literature "bpc" is bits per byte, that figure is ``mean loss / ln 2`` (``valid_bytes`` below).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from longctx.data.corpus import corpus_fingerprint, load_documents, split_corpus
from longctx.data.structure import HEADING_KINDS, heading_spans
from longctx.data.tokenizer import ByteTokenizer, load_tokenizer
from longctx.errors import LongctxError
from longctx.io import publish_dir
from longctx.progress import Progress, phase
from longctx.paths import cache_root

CACHE_VERSION = 1


@dataclass
class TokenStream:
    """The concatenated token ids of a corpus; ``doc_starts[i]`` is where document ``i`` begins."""

    ids: np.ndarray        # int32 or uint16 [n]
    heading: np.ndarray    # bool [n]
    doc_starts: np.ndarray  # int64 [n_docs]

    def __len__(self) -> int:
        return len(self.ids)


def heading_flags(structure: list[dict] | None, offsets: np.ndarray, kinds=HEADING_KINDS) -> np.ndarray:
    """``heading_global_mask`` vectorised: True where a token's ``[start, end)`` overlaps a heading span."""
    n = len(offsets)
    if not structure or n == 0:
        return np.zeros(n, dtype=bool)
    spans = np.asarray(heading_spans(structure, kinds), dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0:
        return np.zeros(n, dtype=bool)
    a, b = offsets[:, 0], offsets[:, 1]
    i = np.searchsorted(spans[:, 0], b - 1, side="right") - 1
    return (b > a) & (i >= 0) & (spans[np.maximum(i, 0), 1] > a)


def _encode_all(docs: list[dict], tokenizer):
    """``(ids, offsets)`` per document, in order; offsets are None where no heading needs them."""
    if isinstance(tokenizer, ByteTokenizer):
        for d in docs:
            if d.get("structure"):
                yield tokenizer.encode_arrays(d["text"])
            else:  # the bytes are the ids: 1 byte a token, not 40 (text8 is 100M characters)
                yield np.frombuffer(d["text"].encode("utf-8", "surrogatepass"), dtype=np.uint8), None
        return
    for i in range(0, len(docs), 64):  # batches: the Rust side runs them in parallel
        for ids, offsets in tokenizer.encode_batch([d["text"] for d in docs[i:i + 64]]):
            yield np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


def tokenize_documents(docs: list[dict], tokenizer, cache_dir: str | Path | None = None,
                       heading_kinds=HEADING_KINDS) -> TokenStream:
    """Encode ``docs`` in order into one ``TokenStream`` (cached under ``cache_dir`` when given)."""
    if tokenizer.sep_id is None:
        raise LongctxError("the tokenizer has no separator/eos token to put between documents; use a tokenizer "
                           "with [SEP], </s> or <eos>.")
    folder = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{corpus_fingerprint(docs)}|{tokenizer.fingerprint()}|{','.join(heading_kinds)}|"
                             f"v{CACHE_VERSION}".encode()).hexdigest()[:24]
        folder = Path(cache_dir) / key
        if (folder / "meta.json").exists():
            return TokenStream(np.load(folder / "ids.npy"), np.load(folder / "heading.npy"),
                               np.load(folder / "doc_starts.npy"))
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    parts_ids, parts_head, starts, pos = [], [], [], 0
    sep = np.array([tokenizer.sep_id], dtype=np.int64)
    bar = Progress(len(docs), "tokenising", "docs", delay=2.0)  # shown only when it takes a while
    for doc, (ids, offsets) in zip(docs, _encode_all(docs, tokenizer)):
        bar.update(1)
        starts.append(pos)
        parts_ids += [ids, sep]
        head = np.zeros(len(ids), bool) if offsets is None else heading_flags(doc.get("structure"), offsets, heading_kinds)
        parts_head += [head, np.zeros(1, dtype=bool)]
        pos += len(ids) + 1
    bar.close()
    stream = TokenStream(np.concatenate(parts_ids, dtype=dtype, casting="unsafe") if parts_ids else np.zeros(0, dtype),
                         np.concatenate(parts_head) if parts_head else np.zeros(0, bool),
                         np.asarray(starts, dtype=np.int64))
    if folder is not None:
        with publish_dir(folder, replace=False) as tmp:  # kept if another process wrote the same key first
            np.save(tmp / "ids.npy", stream.ids)
            np.save(tmp / "heading.npy", stream.heading)
            np.save(tmp / "doc_starts.npy", stream.doc_starts)
            (tmp / "meta.json").write_text(json.dumps({
                "documents": len(docs), "tokens": int(len(stream)), "heading_tokens": int(stream.heading.sum()),
                "tokenizer": tokenizer.fingerprint(), "heading_kinds": list(heading_kinds)}, indent=1))
    return stream


class PackedDataset(Dataset):
    """Consecutive ``seq_len``-token blocks of a ``TokenStream`` (see the module doc)."""

    def __init__(self, stream: TokenStream, seq_len: int, start_token: int | None = None, drop_last: bool = True):
        per_block = seq_len - (start_token is not None)
        if per_block < 1:
            raise LongctxError(f"seq_len {seq_len} is too short for a block; use a positive sequence length.")
        self.stream, self.seq_len, self.start_token, self.drop_last = stream, seq_len, start_token, drop_last
        self.per_block = per_block
        n = len(stream)
        self.n_blocks = n // per_block if drop_last else -(-n // per_block)
        if self.n_blocks == 0:
            raise LongctxError(f"the corpus has {n} tokens, fewer than one block of {per_block}; use a larger "
                               f"corpus or a shorter seq_len.")

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n_blocks <= i < self.n_blocks:
            raise IndexError(i)
        i %= self.n_blocks
        a = i * self.per_block
        ids = torch.from_numpy(self.stream.ids[a:a + self.per_block].astype(np.int64))
        heading = torch.from_numpy(np.array(self.stream.heading[a:a + self.per_block], dtype=bool))
        if self.start_token is not None:
            ids = torch.cat([torch.tensor([self.start_token]), ids])
            heading = torch.cat([torch.zeros(1, dtype=torch.bool), heading])
        return {"input_ids": ids, "heading": heading}


@dataclass
class PreparedData:
    """What training needs: the tokenizer and the token streams of each split (pack them per phase).
    ``test`` is None when the split has no test part (a corpus of several documents, by default)."""

    tokenizer: object
    train: TokenStream
    valid: TokenStream
    train_docs: int
    valid_docs: int
    valid_chars: int  # characters of the valid text (+1 per separator): bits per character = nats * tokens / chars / ln 2
    test: TokenStream | None = None
    test_docs: int = 0
    test_chars: int = 0
    valid_bytes: int = 0  # UTF-8 bytes of the valid text (+1 per separator): bits per byte = nats * tokens / bytes / ln 2


def _chars(docs: list[dict]) -> int:
    return sum(len(d["text"]) + 1 for d in docs)


def _utf8_bytes(docs: list[dict]) -> int:
    return sum(len(d["text"].encode("utf-8", "surrogatepass")) + 1 for d in docs)


def prepare_data(source="default", tokenizer="bytes", valid_fraction: float = 0.05, seed: int = 0,
                 text_field: str = "text", heading_kinds=HEADING_KINDS,
                 cache_dir: str | Path | None = None, test_fraction: float | None = None) -> PreparedData:
    """Load ``source``, split it (``split_corpus``), load or train ``tokenizer`` on the train part, tokenize.

    ``cache_dir`` defaults to ``longctx.paths.cache_root()``; token streams go to ``tokens/`` in it and
    trained tokenizers to ``tokenizers/``. ``test_fraction``: see ``split_corpus`` (None: a single
    text gets a test part as large as the valid one, several documents get none).
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    with phase(f"loading the corpus ({source})"):  # said only when it takes a while, as the tokenising bar
        docs = load_documents(source, text_field=text_field)
        train_docs, valid_docs, test_docs = split_corpus(docs, valid_fraction, seed, test_fraction)
    del docs
    with phase("loading the tokenizer" if isinstance(tokenizer, str) else "training the tokenizer (cached after)"):
        tok = load_tokenizer(tokenizer, documents=train_docs, cache_dir=root / "tokenizers")

    def tokens(part):
        return tokenize_documents(part, tok, root / "tokens", heading_kinds)
    return PreparedData(tok, tokens(train_docs), tokens(valid_docs), len(train_docs), len(valid_docs),
                        _chars(valid_docs), test=tokens(test_docs) if test_docs else None,
                        test_docs=len(test_docs), test_chars=_chars(test_docs), valid_bytes=_utf8_bytes(valid_docs))
