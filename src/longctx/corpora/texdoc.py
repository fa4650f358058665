"""A structure-aware corpus with nothing downloaded: the LaTeX documentation installed on the machine.

Debian's TeX documentation packages (texlive-latex-base-doc, texlive-science-doc, ...) ship the LaTeX
sources of many article-like documents: a title, an abstract or not, ``\\section`` headings, prose. They go
through the same converter as arXiv papers (``build_arxiv_corpus``), so the result has the same
``structured.jsonl`` and ``text.jsonl``. This is what ``data.corpus: texdoc`` (the StructFormer recipe's
default) reads when no arXiv sources are given; the corpus is built once and cached.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

from longctx.corpora.cli import build_arxiv_corpus
from longctx.errors import LongctxError
from longctx.io import publish_dir
from longctx.paths import cache_root

DOC_ROOTS = ("/usr/share/doc/texlive-doc",)
MAX_CHARS = 200_000  # a manual of a whole package is not an article
INSTALL_HINT = ("no arXiv sources were given and no LaTeX documentation is installed to build a corpus from; "
                "install it (apt-get install texlive-latex-base-doc texlive-science-doc) or build a corpus from "
                "your arXiv sources (longctx corpus arxiv SOURCES --out corpus/arxiv) and pass "
                "data.corpus=corpus/arxiv/structured.jsonl")


def _read(path: str) -> str | None:
    try:
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def article_sources(roots=DOC_ROOTS) -> list[tuple[str, str]]:
    """(path, source) of every installed LaTeX file that reads like an article: one \\documentclass, a
    document body and at least two \\section headings, at most MAX_CHARS."""
    found = []
    for root in roots:
        for d, _, files in os.walk(root):
            for f in sorted(files):
                if not f.endswith((".tex", ".tex.gz")):
                    continue
                p = os.path.join(d, f)
                s = _read(p)
                if s is None or len(s) > MAX_CHARS:
                    continue
                c = re.sub(r"(?<!\\)%.*", "", s)
                if len(re.findall(r"\\documentclass", c)) != 1 or "\\begin{document}" not in c:
                    continue
                if len(re.findall(r"\\section(?![a-zA-Z@])", c.split("\\begin{document}", 1)[1])) < 2:
                    continue
                found.append((p, s))
    return sorted(found)


def texdoc_corpus(roots=DOC_ROOTS, progress: bool = True) -> Path:
    """The path of ``structured.jsonl`` built from the installed LaTeX documentation (cached; built on
    first use, which takes about a minute on 2 cores), or LongctxError saying what to install or pass."""

    sources = article_sources(roots)
    if not sources:
        raise LongctxError(INSTALL_HINT)
    key = hashlib.sha256("|".join(f"{p}:{len(s)}" for p, s in sources).encode()).hexdigest()[:16]
    out = cache_root() / "corpora" / f"texdoc-{key}"
    if (out / "structured.jsonl").exists():
        if progress:
            print(f"corpus: no arXiv sources given; using the corpus built from the {len(sources)} LaTeX "
                  f"documents installed under {', '.join(roots)} ({out / 'structured.jsonl'})", file=sys.stderr)
        return out / "structured.jsonl"
    if progress:
        print(f"corpus: no arXiv sources given; building a structure-aware corpus from the {len(sources)} LaTeX "
              f"documents installed under {', '.join(roots)} (once; cached in {out})", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the corpus is published whole; one another process built first is kept
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-texdoc-in-") as inp, \
            publish_dir(out, replace=False, prefix=".tmp-texdoc-") as tmp:
        inp = Path(inp)
        for i, (p, s) in enumerate(sources):
            # flat, unique names (many packages ship a guide.tex): the id says where it came from
            name = f"{i:04d}-" + re.sub(r"[^A-Za-z0-9]+", "_", os.path.relpath(p, os.path.commonpath(roots)))
            (inp / f"{name.removesuffix('_gz').removesuffix('_tex')}.tex").write_text(s, encoding="utf-8")
        build_arxiv_corpus([str(inp)], str(tmp), workers=min(2, os.cpu_count() or 1), progress=False)
    if not (out / "structured.jsonl").exists():
        raise LongctxError(f"building the corpus from the installed LaTeX documentation failed (nothing in {out}); "
                           "build one with longctx corpus arxiv and pass data.corpus=...")
    return out / "structured.jsonl"
