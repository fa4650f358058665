"""The default corpus: Python standard library documentation as plain text, the same on every machine.

Two corpora come from here:

- ``default`` (``load_default_corpus``): a snapshot shipped with longctx,
  ``pydoc-corpus-v1.jsonl.xz`` beside this file (built once by ``build_pydoc_corpus`` on CPython
  3.11.7, 206 documents, 4.16 M characters, 0.39 MB compressed). Nothing is built and the installed
  Python is not read, so every machine trains and evaluates on the same text; the documents'
  ``corpus_fingerprint`` must equal ``SNAPSHOT_SHA256`` (checked on every load: a damaged or edited
  file stops with one sentence). Before, ``default`` was built from the installed Python, and a
  different patch version gave different text, QA data and scores.
- ``pydoc`` (``load_pydoc_corpus``): the same kind of corpus built from the installed Python's
  standard library, for those who want their own version's documentation. ``pydoc`` renders each
  module's docstrings (``pydoc.render_doc(module, renderer=pydoc.plaintext)``), about 4 MB of real
  English technical prose with section headings. Built once (about 6 s of CPU, in child processes so
  module imports cannot touch this process) and cached as JSONL at
  ``$LONGCTX_CACHE/default_corpus/pydoc-<python version>-v<N>.jsonl`` (default
  ``~/.cache/longctx/``), written to a temporary file and renamed.

Each document is ``{"id": module name, "text": ..., "structure": [{"kind", "level", "start", "end"}, ...]}``:
the first line ("Python Library Documentation: module json") is a ``title`` span and each
capitalised heading at line start ("NAME", "DESCRIPTION", "CLASSES", "FUNCTIONS", "DATA", ...) a
``section`` span (level 1), so ``global_tokens: headings`` works here as on the arXiv corpus.

Machine-specific text is left out: the ``FILE`` and ``MODULE REFERENCE`` sections (install path,
boilerplate), the ``sys`` page's ``DATA`` (the rendering process's state: argv, paths, loaded
modules), object addresses (``at 0x7f...``, ctypes' ``handle 7f...``), and install prefixes / the home folder, replaced by
``<prefix>`` / ``<home>``. The children run with an empty environment (``os.environ`` would otherwise
be rendered into the ``os`` and ``cgi`` pages). ``python -m longctx.corpora.default_corpus
--snapshot FILE`` builds the corpus from the installed Python and writes it as a snapshot file.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import lzma
import os
import pydoc
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

# longctx modules are imported inside functions: the render children run this file as a script.

FORMAT_VERSION = 2
SNAPSHOT = Path(__file__).with_name("pydoc-corpus-v1.jsonl.xz")
SNAPSHOT_SHA256 = "3bedcd6a3ed675e2771ded731a80f34258040bf31d1f07b0cac8387deff0c7c3"
SNAPSHOT_SOURCE = "pydoc of CPython 3.11.7 (Linux), shipped snapshot pydoc-corpus-v1"
# GUI, side effects on import, or nothing to read.
EXCLUDED = frozenset({"antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib"})
DROPPED_SECTIONS = frozenset({"FILE", "MODULE REFERENCE"})
PROCESS_STATE = {"sys": frozenset({"DATA"})}  # a page's section that shows the rendering process, not documentation
N_CHUNKS = 4  # fixed, so the result does not depend on the number of cores
_HEADING = re.compile(r"^[A-Z][A-Z ]*[A-Z]$")


def module_names() -> list[str]:
    """The sorted public top-level standard-library modules that are rendered (some may still fail)."""
    return sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in EXCLUDED)


def load_default_corpus() -> list[dict]:
    """The shipped snapshot as a list of ``{"id", "text", "structure"}``, checked against its hash."""
    # imported here: the render children run this file as a script and must import nothing of longctx
    from longctx.data.corpus import corpus_fingerprint
    from longctx.errors import LongctxError

    try:
        lines = lzma.decompress(SNAPSHOT.read_bytes()).decode("utf-8").splitlines()
        docs = [json.loads(line) for line in lines if line.strip()]
        ok = corpus_fingerprint(docs) == SNAPSHOT_SHA256
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise LongctxError(f"the built-in default corpus {SNAPSHOT} is missing or damaged (its sha256 is not "
                           f"{SNAPSHOT_SHA256[:12]}...); reinstall longctx, or set data.corpus: pydoc to build "
                           f"the corpus from this machine's Python instead.")
    return docs


def cache_path() -> Path:
    from longctx.paths import cache_root

    v = sys.version_info
    return cache_root() / "default_corpus" / f"pydoc-{sys.implementation.name}{v.major}.{v.minor}.{v.micro}-v{FORMAT_VERSION}.jsonl"


def load_pydoc_corpus(rebuild: bool = False) -> list[dict]:
    """The installed Python's documentation as ``{"id", "text", "structure"}``, built and cached on first use."""
    path = cache_path()
    if rebuild or not path.exists():
        docs = build_pydoc_corpus()
        try:
            _write_cache(path, docs)
        except OSError as e:  # a full disk or a read-only cache: the corpus is still good, only not kept
            warnings.warn(f"could not cache the pydoc corpus in {path.parent} ({e.strerror or e}); "
                          "it will be built again next time.", stacklevel=2)
        return docs
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_cache(path: Path, docs: list[dict]) -> None:
    from longctx.io import write_jsonl

    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, docs)


def write_snapshot(path: Path, docs: list[dict]) -> str:
    """Write ``docs`` as a snapshot file (JSONL, xz -9e) atomically; return their fingerprint."""
    from longctx.data.corpus import corpus_fingerprint
    from longctx.io import write_bytes

    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    write_bytes(path, lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    return corpus_fingerprint(docs)


def build_pydoc_corpus() -> list[dict]:
    """Render the documents now (no cache): child processes each render a fixed slice of the modules."""
    names = module_names()
    chunks = [names[i::N_CHUNKS] for i in range(N_CHUNKS)]
    workers = max(1, min(N_CHUNKS, os.cpu_count() or 1))
    env = {"PATH": os.defpath, "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="longctx-pydoc-") as tmp:
        pending = list(enumerate(chunks))
        running: list[tuple[subprocess.Popen, Path]] = []
        while pending or running:
            while pending and len(running) < workers:
                i, chunk = pending.pop(0)
                out = Path(tmp) / f"chunk{i}.jsonl"
                # run this file as a script (-I: no script folder on sys.path), so the child imports
                # nothing but the module it renders
                cmd = [sys.executable, "-I", str(Path(__file__).resolve()), "--render", str(out), *chunk]
                proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                running.append((proc, out))
            proc, out = running.pop(0)
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            # a child that died part-way still left every finished module (one line each)
            if out.exists():
                with open(out, encoding="utf-8") as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # cut last line of a killed child
                        results[rec["name"]] = rec
    docs = []
    for name in names:
        if name in results:
            drop = DROPPED_SECTIONS | PROCESS_STATE.get(name, frozenset())
            text, structure = clean_pydoc(results[name]["text"], results[name]["prefixes"], drop)
            docs.append({"id": name, "text": text, "structure": structure})
    if not docs:
        raise RuntimeError("rendering the standard library documentation with pydoc produced no documents")
    return docs


def _render_chunk(out_path: str, names: list[str]) -> None:
    """Child process: import and render each module; skip those that fail or print."""

    warnings.simplefilter("ignore")
    os.environ.clear()  # a page may render os.environ (os, cgi); startup may have added to the given one
    prefixes = {"<prefix>": sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}, key=len, reverse=True),
                "<home>": [os.path.expanduser("~")],
                "<longctx>": [os.path.dirname(os.path.abspath(__file__))], "<tmp>": [tempfile.gettempdir(), os.getcwd()]}
    with open(out_path, "w", encoding="utf-8") as f:
        for name in names:
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                    module = importlib.import_module(name)
                    text = pydoc.render_doc(module, renderer=pydoc.plaintext)
            except BaseException:  # noqa: BLE001 - any failure just skips the module (SystemExit included)
                continue
            if buf.getvalue():
                continue  # printed something on import: not documentation
            f.write(json.dumps({"name": name, "text": text, "prefixes": prefixes}) + "\n")
            f.flush()


def clean_pydoc(text: str, prefixes: dict[str, list[str]] | None = None,
                drop: frozenset[str] = DROPPED_SECTIONS) -> tuple[str, list[dict]]:
    """Drop the ``drop`` sections and machine-specific strings; return the text and its title/section spans."""
    pairs = [(v, ph) for ph, values in (prefixes or {}).items() for v in values if v and len(v) > 1]
    for value, placeholder in sorted(pairs, key=lambda p: len(p[0]), reverse=True):  # longest first
        text = text.replace(value, placeholder)
    text = re.sub(r" at 0x[0-9a-fA-F]+", " at 0x...", text)
    text = re.sub(r", handle [0-9a-f]+>", ", handle ...>", text)  # ctypes' library handles
    lines = text.replace("\r\n", "\n").split("\n")
    kept: list[str] = []
    skipping = False
    for i, line in enumerate(lines):
        if i > 0 and _HEADING.match(line):
            skipping = line in drop
        if not skipping:
            kept.append(line)
    text = "\n".join(kept).rstrip() + "\n"
    structure = []
    pos = 0
    for i, line in enumerate(text.split("\n")):
        if i == 0 and line.strip():
            structure.append({"kind": "title", "level": 0, "start": pos, "end": pos + len(line)})
        elif _HEADING.match(line):
            structure.append({"kind": "section", "level": 1, "start": pos, "end": pos + len(line)})
        pos += len(line) + 1
    return text, structure


if __name__ == "__main__" and sys.argv[1:2] == ["--render"]:  # child process of build_default_corpus
    _render_chunk(sys.argv[2], sys.argv[3:])
elif __name__ == "__main__":  # python -m longctx.corpora.default_corpus [--rebuild | --snapshot FILE]
    import time

    t0 = time.perf_counter()
    if "--snapshot" in sys.argv:
        out = Path(sys.argv[sys.argv.index("--snapshot") + 1])
        corpus = build_pydoc_corpus()
        print(f"snapshot {out}: sha256 {write_snapshot(out, corpus)}, {out.stat().st_size:,} bytes")
    else:
        corpus = load_pydoc_corpus(rebuild="--rebuild" in sys.argv)
    print(f"{len(corpus)} documents, {sum(len(d['text']) for d in corpus):,} characters, "
          f"{time.perf_counter() - t0:.1f} s, cache {cache_path()}")
