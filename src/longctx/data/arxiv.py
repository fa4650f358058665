"""Reading arXiv-style LaTeX sources safely, in memory.

arXiv ships a paper as a gzipped tar (many files), a single gzipped ``.tex`` (one-file papers), or, once
unpacked, a folder; people also keep plain ``.tex`` files. All of them are untrusted. Nothing here ever
extracts to disk: ``read_source`` streams the archive through a byte counter, validates each member's
header before reading it, and keeps only the text files a LaTeX build could read, in a dict. A member
that escapes the archive (``../``, absolute paths), any link, device or FIFO, too many members or more
unpacked bytes than the cap reject the whole paper with a reason; so do truncated or corrupt archives
and text that is not UTF-8 (unless ``latin1_fallback``).
"""
from __future__ import annotations

import gzip
import io
import os
import posixpath
import stat
import tarfile
import zlib
from dataclasses import dataclass

from longctx.data.latex import LatexConversionError, convert

# file names (lower case) whose text a paper can \input; everything else (figures, .bbl, .sty) is
# skipped, though its bytes still count toward the unpacked-size cap
TEXT_SUFFIXES = (".tex", ".ltx", ".latex", ".txt", ".tikz")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".gz")
INPUT_SUFFIXES = ARCHIVE_SUFFIXES + (".tex", ".ltx", ".latex")


@dataclass(frozen=True)
class Limits:
    max_members: int = 5000            # tar members per paper
    max_bytes: int = 256 * 2**20       # unpacked bytes per paper (all members, tar headers included)
    max_text_bytes: int = 32 * 2**20   # bytes of LaTeX text kept per paper
    latin1_fallback: bool = False      # decode non-UTF-8 text as Latin-1 instead of rejecting


class Rejected(Exception):
    """One paper cannot be used; ``reason`` is a short code, ``detail`` says what was found."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class _CappedReader(io RawIOBase if False else io.RawIOBase):  # noqa: E999 (kept simple below)
    pass
