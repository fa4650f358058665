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
stream, so staged training changes the length with ``dataset.with_seq_len(n)`` and no re-tokenizing.
``start_token=tok.cls_id`` begins every block with that token (then ``seq_len - 1`` stream tokens per
block), e.g. for a [CLS] that ``global_tokens: first`` makes global.

``prepare_data(source, tokenizer, ...)`` does the whole chain: load, split by document, load or
train the tokenizer, tokenize train and valid (cached). Default cache: ``$LONGCTX_CACHE`` or
``~/.cache/longctx`` (``tokens/`` and ``tokenizers/`` in it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from longctx.data.corpus import corpus_fingerprint, load_documents, split_documents
from longctx.data.structure import HEADING_KINDS, heading_spans
from longctx.data.tokenizer import ByteTokenizer, load_tokenizer
from longctx.errors import LongctxError

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


def _encode_all(docs: list[dict], tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    if isinstance(tokenizer, ByteTokenizer):
        return [tokenizer.encode_arrays(d["text"]) for d in docs]
    out = []
    for i in range(0, len(docs), 64):  # batches: the Rust side runs them in parallel
        for ids, offsets in tokenizer.encode_batch([d["text"] for d in docs[i:i + 64]]):
            out.append((np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)))
    return out


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
    for doc, (ids, offsets) in zip(docs, _encode_all(docs, tokenizer)):
        starts.append(pos)
        parts_ids += [ids, sep]
        parts_head += [heading_flags(doc.get("structure"), offsets, heading_kinds), np.zeros(1, dtype=bool)]
        pos += len(ids) + 1
    stream = TokenStream(np.concatenate(parts_ids).astype(dtype) if parts_ids else np.zeros(0, dtype),
                         np.concatenate(parts_head) if parts_head else np.zeros(0, bool),
                         np.asarray(starts, dtype=np.int64))
    if folder is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            np.save(tmp / "ids.npy", stream.ids)
            np.save(tmp / "heading.npy", stream.heading)
            np.save(tmp / "doc_starts.npy", stream.doc_starts)
            (tmp / "meta.json").write_text(json.dumps({
                "documents": len(docs), "tokens": int(len(stream)), "heading_tokens": int(stream.heading.sum()),
                "tokenizer": tokenizer.fingerprint(), "heading_kinds": list(heading_kinds)}, indent=1))
            os.replace(tmp, folder)
        except OSError:
            pass  # another process wrote the same key first (rename onto a non-empty folder fails)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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

    def with_seq_len(self, seq_len: int) -> PackedDataset:
        """The same stream packed at another length (staged training)."""
        return PackedDataset(self.stream, seq_len, self.start_token, self.drop_last)

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
    """What training needs: the tokenizer and the train / valid token streams (pack them per phase)."""

    tokenizer: object
    train: TokenStream
    valid: TokenStream
    train_docs: int
    valid_docs: int
    valid_chars: int  # characters of the valid text (+1 per separator): bits per character = nats * tokens / chars / ln 2


def prepare_data(source="default", tokenizer="bytes", valid_fraction: float = 0.05, seed: int = 0,
                 text_field: str = "text", heading_kinds=HEADING_KINDS,
                 cache_dir: str | Path | None = None) -> PreparedData:
    """Load ``source``, split it by document, load or train ``tokenizer`` on the train part, tokenize both.

    ``cache_dir`` defaults to ``$LONGCTX_CACHE`` / ``~/.cache/longctx``; token streams go to
    ``tokens/`` in it and trained tokenizers to ``tokenizers/``.
    """
    from longctx.data.default_corpus import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    docs = load_documents(source, text_field=text_field)
    train_docs, valid_docs = split_documents(docs, valid_fraction, seed)
    tok = load_tokenizer(tokenizer, documents=train_docs, cache_dir=root / "tokenizers")
    return PreparedData(tok, tokenize_documents(train_docs, tok, root / "tokens", heading_kinds),
                        tokenize_documents(valid_docs, tok, root / "tokens", heading_kinds),
                        len(train_docs), len(valid_docs), sum(len(d["text"]) + 1 for d in valid_docs))
