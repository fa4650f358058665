"""Global attention on headings (StructFormer): which tokens of a document are heading tokens.

``structured.jsonl`` (written by ``longctx corpus arxiv``) gives each document's outline as character
spans ``{"kind", "level", "start", "end"}`` into its ``text``. A fast tokenizer gives each token's
character span (``tokenizers`` ``Encoding.offsets``, or ``return_offsets_mapping=True`` in
transformers). ``heading_global_mask`` lines the two up: a token is global when its characters overlap
a span of one of ``kinds``. This is what the config value ``global_tokens: headings`` selects.

Default kinds: the title and the section, subsection and subsubsection headings. The abstract is left
out on purpose: its span covers the whole abstract paragraph (often 150-300 tokens), and making all of
it global would turn a sparse pattern into a dense one; pass ``kinds=HEADING_KINDS + ("abstract",)``
to include it anyway. Special tokens ([CLS], [SEP], padding) have empty offsets ``(0, 0)`` and are
never marked here; add them with the task's own preset.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence

HEADING_KINDS = ("title", "section", "subsection", "subsubsection")


def heading_spans(structure: Iterable[dict], kinds: Sequence[str] = HEADING_KINDS) -> list[tuple[int, int]]:
    """The ``(start, end)`` character spans of the wanted kinds, sorted and merged where they touch."""
    wanted = set(kinds)
    spans = sorted((int(s["start"]), int(s["end"])) for s in structure
                   if s["kind"] in wanted and int(s["end"]) > int(s["start"]))
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def heading_global_mask(structure: list[dict], offsets: list[tuple[int, int]],
                        kinds: Sequence[str] = HEADING_KINDS, char_offset: int = 0) -> list[bool]:
    """One boolean per token: True when the token's characters overlap a span of ``kinds``.

    ``offsets`` are the tokenizer's ``(start, end)`` character offsets into the text the spans refer
    to; when the tokenized text is a window of the document starting at character ``char_offset``,
    pass that and the spans are shifted to match. Empty offsets (special tokens) are False.
    """
    spans = [(a - char_offset, b - char_offset) for a, b in heading_spans(structure, kinds)]
    starts = [a for a, _ in spans]
    mask = []
    for tok in offsets:
        a, b = int(tok[0]), int(tok[1])
        if b <= a:
            mask.append(False)
            continue
        # the last span starting before the token ends is the only one that can overlap it (merged,
        # so spans are disjoint and sorted)
        i = bisect_right(starts, b - 1) - 1
        mask.append(i >= 0 and spans[i][1] > a)
    return mask
