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

from longctx.corpora.latex import Rejected, convert, find_main_file

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
    # memory one paper's conversion may use, above the worker's own footprint: parsing takes up to
    # ~320 bytes per byte of hostile LaTeX (4 MB of `\x` reached 1.67 GB), so the text cap alone does
    # not bound it. Papers estimated over it are rejected before parsing (latex.estimate_parse_memory);
    # the worker's address-space limit (RLIMIT_AS) enforces it for the rest.
    max_memory_bytes: int = 1024 * 2**20


class _CappedReader(io.RawIOBase):
    """Reads from ``raw`` and raises ``Rejected('too-large')`` once more than ``cap`` bytes came out,
    so a decompression bomb stops after at most ``cap`` bytes, whatever the headers claim."""

    def __init__(self, raw, cap: int, prefix: bytes = b""):
        self.raw, self.cap, self.count, self.prefix = raw, cap, 0, prefix

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.prefix:
            n = min(len(b), len(self.prefix))
            b[:n], self.prefix = self.prefix[:n], self.prefix[n:]
            return n
        want = min(len(b), self.cap + 1 - self.count)
        if want <= 0:
            raise Rejected("too-large", f"unpacks to more than {self.cap} bytes")
        data = self.raw.read(want)
        self.count += len(data)
        if self.count > self.cap:
            raise Rejected("too-large", f"unpacks to more than {self.cap} bytes")
        b[:len(data)] = data
        return len(data)


def _decode(name: str, data: bytes, limits: Limits) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if limits.latin1_fallback:
            return data.decode("latin-1")
        raise Rejected("not-utf8", f"{name}: undecodable byte at offset {e.start}") from None


def _is_text_name(name: str) -> bool:
    base = posixpath.basename(name).lower()
    return base.endswith(TEXT_SUFFIXES) or "." not in base


def _check_member(m: tarfile.TarInfo) -> str:
    """The member's safe relative path, or raise Rejected."""
    name = m.name
    if m.issym():
        raise Rejected("symlink", f"{name} -> {m.linkname}")
    if m.islnk():
        raise Rejected("hardlink", f"{name} -> {m.linkname}")
    if m.isdev() or m.isfifo() or not (m.isfile() or m.isdir()):
        raise Rejected("special-file", f"{name} (type {m.type!r})")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\x00" in name:
        raise Rejected("absolute-path", name)
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise Rejected("path-traversal", name)
    clean = posixpath.normpath("/".join(p for p in parts if p not in ("", ".")) or ".")
    return clean


def _read_tar(stream, limits: Limits, counter: _CappedReader) -> dict[str, str]:
    files: dict[str, str] = {}
    kept = 0
    try:
        tf = tarfile.open(fileobj=stream, mode="r|")
        for i, m in enumerate(tf):
            if i >= limits.max_members:
                raise Rejected("too-many-members", f"more than {limits.max_members} members")
            path = _check_member(m)
            if m.isdir():
                continue
            if m.size > limits.max_bytes - counter.count:
                raise Rejected("too-large", f"{m.name} declares {m.size} bytes, over the cap of "
                                            f"{limits.max_bytes}")
            if not _is_text_name(path):
                continue  # the stream skips its data, still through the byte counter
            if kept + m.size > limits.max_text_bytes:
                raise Rejected("too-large", f"more than {limits.max_text_bytes} bytes of text")
            f = tf.extractfile(m)
            data = f.read() if f is not None else b""
            if len(data) != m.size:
                raise Rejected("truncated", f"{m.name}: {len(data)} of {m.size} bytes")
            kept += len(data)
            files[path] = data  # decoded once we know which files the paper uses
    except Rejected:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        raise Rejected("corrupt-archive", f"{type(e).__name__}: {e}") from None
    return files


def _looks_like_tar(head: bytes) -> bool:
    if len(head) < 512:
        return False
    try:
        tarfile.TarInfo.frombuf(head[:512], "utf-8", "surrogateescape")
        return True
    except tarfile.HeaderError:
        return False


def read_source(path: str, limits: Limits = Limits()) -> tuple[dict[str, str], str | None]:
    """The text files of one paper as ``{relative path: text}``, and the main file's name when the
    input is a single file. Raises ``Rejected`` with the reason when the paper cannot be used."""
    if os.path.islink(path):
        raise Rejected("symlink", os.path.basename(path))
    if os.path.isdir(path):
        return _read_dir(path, limits), None
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Rejected("special-file", os.path.basename(path))
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        src = gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw
        counter = _CappedReader(src, limits.max_bytes)
        try:
            head = counter.read(512)
            while len(head) < 512:
                more = counter.read(512 - len(head))
                if not more:
                    break
                head += more
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
            raise Rejected("corrupt-archive", f"{type(e).__name__}: {e}") from None
        name_low = os.path.basename(path).lower()
        if magic != b"\x1f\x8b" and name_low.endswith((".gz", ".tgz")) and not _looks_like_tar(head):
            # named as gzip but neither gzip nor an (uncompressed) tar: the download is broken
            raise Rejected("corrupt-archive", "not a gzip file (and not a tar archive either)")
        if name_low.endswith(".tar") and not _looks_like_tar(head):
            raise Rejected("corrupt-archive", "not a tar archive")
        if _looks_like_tar(head):
            counter.prefix = head
            data = _read_tar(io.BufferedReader(counter, 65536), limits, counter)
            main = None
        else:
            # a single (possibly gzipped) .tex file
            try:
                rest = counter.read()
            except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
                raise Rejected("corrupt-archive", f"{type(e).__name__}: {e}") from None
            body = head + rest
            if len(body) > limits.max_text_bytes:
                raise Rejected("too-large", f"more than {limits.max_text_bytes} bytes of text")
            name = os.path.basename(path)
            for suf in (".gz",):
                if name.lower().endswith(suf):
                    name = name[: -len(suf)]
            if not name.lower().endswith((".tex", ".ltx", ".latex")):
                name += ".tex"
            data, main = {name: body}, name
    return {k: _decode(k, v, limits) if k == main else v for k, v in data.items()}, main


def _read_dir(root: str, limits: Limits) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = n = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                raise Rejected("symlink", os.path.relpath(os.path.join(dirpath, d), root))
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                raise Rejected("symlink", rel)
            if not stat.S_ISREG(st.st_mode):
                raise Rejected("special-file", rel)
            n += 1
            if n > limits.max_members:
                raise Rejected("too-many-members", f"more than {limits.max_members} files")
            if not _is_text_name(rel):
                continue
            total += st.st_size
            if total > limits.max_text_bytes:
                raise Rejected("too-large", f"more than {limits.max_text_bytes} bytes of text")
            with open(full, "rb") as f:
                files[rel] = f.read(limits.max_text_bytes + 1)
    return files


def convert_source(path: str, limits: Limits = Limits()) -> dict:
    """Read and convert one paper. Returns the record for ``structured.jsonl`` (without ``id``), plus
    ``missing_inputs`` (files it ``\\input``s that the source lacks; reported in the corpus stats, not
    stored in the record); raises ``Rejected`` when the paper cannot be used."""
    files, main = read_source(path, limits)
    if not files:
        raise Rejected("no-tex", "no LaTeX files in the source")
    if main is None:
        undecoded = {k: v.decode("latin-1") if isinstance(v, bytes) else v for k, v in files.items()}
        main = find_main_file(undecoded)
    # decode strictly now that we know which paper this is: every text file the paper may \input
    texts = {k: _decode(k, v, limits) if isinstance(v, bytes) else v for k, v in files.items()}
    try:
        doc = convert(texts, main, max_chars=limits.max_text_bytes, max_memory=limits.max_memory_bytes)
    except RecursionError:
        raise Rejected("latex-error", "nesting too deep to parse") from None
    if not doc.text.strip():
        raise Rejected("empty", "no text after conversion")
    return {"title": doc.title, "text": doc.text, "structure": doc.structure,
            "main_file": doc.main_file, "missing_inputs": doc.missing_inputs}


# --------------------------------------------------------------------------------------------------
# finding the papers under an input folder

def _is_input_file(name: str) -> bool:
    return name.lower().endswith(INPUT_SUFFIXES)


def _is_unpacked_source(d: str) -> bool:
    """A folder is one unpacked paper when it holds no archives, at least one .tex file at its top,
    and exactly one of those top files has ``\\documentclass``."""
    try:
        entries = sorted(os.listdir(d))
    except OSError:
        return False
    tex, mains = [], 0
    for e in entries:
        low = e.lower()
        full = os.path.join(d, e)
        if os.path.islink(full) or not os.path.isfile(full):
            continue
        if low.endswith(ARCHIVE_SUFFIXES):
            return False
        if low.endswith((".tex", ".ltx", ".latex")):
            tex.append(full)
            with open(full, "rb") as f:
                head = f.read(65536)
            if b"\\documentclass" in head or b"\\documentstyle" in head:
                mains += 1
    return bool(tex) and mains == 1 and not _main_below(d)


def _main_below(d: str) -> bool:
    """Whether a subfolder of ``d`` holds a file with ``\\documentclass`` (then ``d`` is a collection)."""
    for sub in sorted(os.listdir(d)):
        full = os.path.join(d, sub)
        if os.path.islink(full) or not os.path.isdir(full):
            continue
        for root, _, files in os.walk(full):
            for f in files:
                if f.lower().endswith(ARCHIVE_SUFFIXES):
                    return True
                if f.lower().endswith((".tex", ".ltx", ".latex")):
                    with open(os.path.join(root, f), "rb") as fh:
                        head = fh.read(65536)
                    if b"\\documentclass" in head or b"\\documentstyle" in head:
                        return True
    return False


def discover(paths: list[str]) -> list[tuple[str, str]]:
    """``(key, path)`` for every paper under the given inputs, sorted, without duplicates. The key is
    the input's path relative to the folder given (or its file name), used as id and for resuming."""
    found: dict[str, str] = {}

    def walk(d: str, root: str, base: str) -> None:
        if _is_unpacked_source(d):
            found.setdefault(_key(d, root, base), d)
            return
        for e in sorted(os.listdir(d)):
            full = os.path.join(d, e)
            if os.path.islink(full):
                continue  # never follow links out of the input folder
            if os.path.isdir(full):
                walk(full, root, base)
            elif os.path.isfile(full) and _is_input_file(e):
                found.setdefault(_key(full, root, base), full)

    for p in paths:
        p = os.path.abspath(p)
        base = os.path.basename(p.rstrip(os.sep))
        if os.path.isdir(p):
            walk(p, p, base if len(paths) > 1 else "")
        else:
            found.setdefault(os.path.basename(p), p)
    return sorted(found.items())


def _key(path: str, root: str, base: str) -> str:
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    if rel == ".":
        rel = os.path.basename(root)
    return f"{base}/{rel}" if base else rel


def doc_id(key: str) -> str:
    """``2101.00001`` for ``2101.00001.tar.gz``: the key without the archive or TeX suffix."""
    low = key.lower()
    for suf in (".tar.gz", ".tgz", ".tar", ".tex.gz", ".gz", ".tex", ".ltx", ".latex"):
        if low.endswith(suf):
            return key[: -len(suf)]
    return key
