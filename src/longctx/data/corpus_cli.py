"""`longctx corpus arxiv INPUT... --out DIR`: arXiv LaTeX sources -> structure-aware + text-only corpora.

Output folder:
  structured.jsonl  {"id", "title", "text", "structure": [{"kind", "level", "start", "end"}], "source", "main_file"}
  text.jsonl        {"id", "text"}: the same documents, same order, same text, no structure
  rejects.jsonl     {"input", "reason", "detail"}
  stats.json        inputs seen, documents kept, rejects by reason, characters, headings per document
  .state/journal.jsonl  one line per finished input (the resume record)

Every input's result is appended to the journal as soon as it is done; the four output files are then
rebuilt from the journal, in input order, each written to a temporary file and renamed. An interrupted
run leaves the previous outputs intact, and a rerun converts only the inputs the journal lacks (or whose
size or modification time changed), so two runs over the same inputs give byte-identical corpora.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter

from longctx.data.arxiv import Limits, Rejected, convert_source, discover, doc_id
from longctx.errors import LongctxError

STATE_DIR = ".state"
JOURNAL = "journal.jsonl"
OUTPUT_FILES = ("structured.jsonl", "text.jsonl", "rejects.jsonl", "stats.json")


def register(subparsers) -> None:
    p = subparsers.add_parser("corpus", help="build training corpora from raw sources")
    sub = p.add_subparsers(dest="corpus_kind", metavar="KIND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    a = sub.add_parser(
        "arxiv", help="arXiv LaTeX sources -> structure-aware and text-only JSONL corpora",
        description="Convert arXiv LaTeX sources (.tar.gz/.tgz/.tar, single .gz, .tex files, unpacked "
                    "folders, or folders of these) into structured.jsonl + text.jsonl in OUT. Usage: "
                    "INPUT... --out OUT, or INPUT OUT.")
    a.add_argument("paths", nargs="+", metavar="INPUT", help="input files or folders (then OUT if --out is not given)")
    a.add_argument("--out", "-o", default=None, help="output folder")
    a.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    a.add_argument("--max-members", type=int, default=Limits.max_members, help="most tar members per paper")
    a.add_argument("--max-mb", type=float, default=Limits.max_bytes / 2**20,
                   help="most unpacked MiB per paper (stops decompression bombs)")
    a.add_argument("--max-text-mb", type=float, default=Limits.max_text_bytes / 2**20,
                   help="most MiB of LaTeX text per paper")
    a.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per paper")
    a.add_argument("--latin1-fallback", action="store_true",
                   help="decode non-UTF-8 files as Latin-1 instead of rejecting the paper")
    a.add_argument("--quiet", action="store_true", help="no progress on stderr")
    a.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    paths = list(args.paths)
    out = args.out
    if out is None:
        if len(paths) < 2:
            raise LongctxError("give the output folder: longctx corpus arxiv INPUT... --out OUT.")
        out = paths.pop()
    if args.workers < 1:
        raise LongctxError(f"--workers must be at least 1, got {args.workers}.")
    limits = Limits(max_members=args.max_members, max_bytes=int(args.max_mb * 2**20),
                    max_text_bytes=int(args.max_text_mb * 2**20), latin1_fallback=args.latin1_fallback)
    stats = build_arxiv_corpus(paths, out, workers=args.workers, limits=limits, timeout=args.timeout,
                               progress=not args.quiet)
    print(f"{stats['documents_kept']} documents kept, {stats['rejected']} rejected, "
          f"{stats['run']['skipped']} already done; corpus in {out}")
    return 0


# --------------------------------------------------------------------------------------------------

def _signature(path: str) -> list[int]:
    """Size and modification time; for a folder, summed over its files (a changed file re-runs it)."""
    if os.path.isdir(path):
        size = mtime = 0
        for d, _, files in os.walk(path):
            for f in files:
                try:
                    st = os.lstat(os.path.join(d, f))
                except OSError:
                    continue
                size += st.st_size
                mtime = max(mtime, st.st_mtime_ns)
        return [size, mtime]
    st = os.lstat(path)
    return [st.st_size, st.st_mtime_ns]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _work(job: tuple) -> dict:
    """Convert one input; never raises (a worker that raised would stop the pool)."""
    key, path, sig, limits, timeout = job
    entry = {"key": key, "sig": sig}
    use_alarm = timeout and hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        rec = convert_source(path, limits)
        entry["record"] = {"id": doc_id(key), **rec, "source": key}
    except Rejected as e:
        entry.update(reason=e.reason, detail=e.detail[:500])
    except _Timeout:
        entry.update(reason="timeout", detail=f"conversion took more than {timeout:g} s")
    except MemoryError:
        entry.update(reason="too-large", detail="out of memory while converting")
    except RecursionError:
        entry.update(reason="latex-error", detail="nesting too deep to parse")
    except Exception as e:  # a bug or a parser crash on hostile input: reject this one, keep going
        entry.update(reason="internal-error", detail=f"{type(e).__name__}: {e}"[:500])
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    return entry


def _load_journal(path: str) -> dict[str, tuple[int, list]]:
    """``{key: (byte offset of its latest line, sig)}``; a half-written last line is ignored."""
    index: dict[str, tuple[int, list]] = {}
    if not os.path.exists(path):
        return index
    with open(path, "rb") as f:
        off = 0
        for line in f:
            try:
                e = json.loads(line)
                index[e["key"]] = (off, e["sig"])
            except (ValueError, KeyError, TypeError):
                pass
            off += len(line)
    return index


class _Progress:
    def __init__(self, total: int, skipped: int, enabled: bool):
        self.total, self.skipped, self.enabled = total, skipped, enabled
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self.every = 1.0 if sys.stderr.isatty() else 10.0

    def step(self, force: bool = False) -> None:
        self.done += 1
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.every):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        left = self.total - self.skipped - self.done
        eta = left / rate if rate > 0 else float("inf")
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta != float("inf") else "?"
        end = "\r" if sys.stderr.isatty() and left else "\n"
        print(f"corpus arxiv: {self.done + self.skipped}/{self.total} inputs "
              f"({self.skipped} already done), {rate:.2f} docs/s, ETA {eta_s}   ",
              end=end, file=sys.stderr, flush=True)


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_paths(inputs: list[str], out: str) -> None:
    if not inputs:
        raise LongctxError("no input given; name a folder of arXiv source archives or .tex files.")
    for p in inputs:
        if not os.path.exists(p):
            raise LongctxError(f"input {p} does not exist; give a folder of arXiv source archives or .tex files.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise LongctxError(f"output {out} is a file; give a folder (new, or one this command wrote before).")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isdir(os.path.join(out, STATE_DIR)):
        raise LongctxError(f"output folder {out} is not empty and was not written by `longctx corpus arxiv`; "
                           "give a new folder so nothing in it is overwritten.")
    out_abs = os.path.realpath(out)
    for p in inputs:
        if os.path.isdir(p) and (out_abs + os.sep).startswith(os.path.realpath(p) + os.sep):
            # the output would be read back as input on the next run
            if os.path.realpath(p) == out_abs:
                raise LongctxError(f"output folder {out} is the input folder; give a separate folder.")


def build_arxiv_corpus(inputs: list[str], out: str, workers: int = 1, limits: Limits = Limits(),
                       timeout: float | None = 300.0, progress: bool = True) -> dict:
    """Convert every paper under ``inputs`` into the corpus files in ``out``; returns the stats."""
    _check_paths(inputs, out)
    t0 = time.monotonic()
    jobs_all = discover(inputs)
    out_abs = os.path.realpath(out)
    jobs_all = [(k, p) for k, p in jobs_all if not os.path.realpath(p).startswith(out_abs + os.sep)]
    if not jobs_all:
        raise LongctxError(f"no arXiv sources (.tar.gz, .tgz, .tar, .gz, .tex) found under {', '.join(inputs)}.")
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    journal_path = os.path.join(out, STATE_DIR, JOURNAL)
    index = _load_journal(journal_path)

    todo = []
    for key, path in jobs_all:
        sig = _signature(path)
        if key in index and index[key][1] == sig:
            continue
        todo.append((key, path, sig, limits, timeout))
    skipped = len(jobs_all) - len(todo)
    prog = _Progress(len(jobs_all), skipped, progress)

    if todo:
        with open(journal_path, "ab") as jf:
            if jf.tell() > 0:
                with open(journal_path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        jf.write(b"\n")  # a crash cut the last line: start clean after it
            for entry in _map(_work, todo, workers):
                line = (json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
                jf.write(line)
                jf.flush()
                prog.step(force=prog.done + 1 == len(todo))
        index = _load_journal(journal_path)

    stats = _write_outputs(out, journal_path, index, jobs_all)
    elapsed = time.monotonic() - t0
    stats["run"] = {"processed": len(todo), "skipped": skipped, "workers": workers,
                    "seconds": round(elapsed, 3),
                    "docs_per_second": round(len(todo) / elapsed, 3) if elapsed > 0 else None}
    _atomic_write(os.path.join(out, "stats.json"), lambda f: json.dump(stats, f, indent=2, sort_keys=True))
    return stats


def _map(fn, jobs, workers):
    if workers <= 1 or len(jobs) == 1:
        for j in jobs:
            yield fn(j)
        return
    import multiprocessing as mp

    # spawn: workers start clean (no inherited threads or locks), the cost is a second per worker
    with mp.get_context("spawn").Pool(min(workers, len(jobs)), maxtasksperchild=500) as pool:
        yield from pool.imap_unordered(fn, jobs, chunksize=1)


def _write_outputs(out: str, journal_path: str, index: dict, jobs: list) -> dict:
    reasons: Counter = Counter()
    kinds: Counter = Counter()
    headings, chars, kept = [], 0, 0
    paths = {name: os.path.join(out, name) for name in OUTPUT_FILES}
    tmps = {name: f"{p}.tmp.{os.getpid()}" for name, p in paths.items()}
    try:
        with open(journal_path, "rb") as jf, \
                open(tmps["structured.jsonl"], "w", encoding="utf-8", newline="\n") as fs, \
                open(tmps["text.jsonl"], "w", encoding="utf-8", newline="\n") as ft, \
                open(tmps["rejects.jsonl"], "w", encoding="utf-8", newline="\n") as fr:
            for key, _ in jobs:
                jf.seek(index[key][0])
                e = json.loads(jf.readline())
                rec = e.get("record")
                if rec is None:
                    reasons[e["reason"]] += 1
                    fr.write(json.dumps({"input": key, "reason": e["reason"], "detail": e.get("detail", "")},
                                        ensure_ascii=False) + "\n")
                    continue
                kept += 1
                chars += len(rec["text"])
                hs = [s for s in rec["structure"] if s["kind"] not in ("title", "abstract")]
                headings.append(len(hs))
                kinds.update(s["kind"] for s in rec["structure"])
                fs.write(json.dumps(rec, ensure_ascii=False) + "\n")
                ft.write(json.dumps({"id": rec["id"], "text": rec["text"]}, ensure_ascii=False) + "\n")
            for f in (fs, ft, fr):
                f.flush()
                os.fsync(f.fileno())
        for name in ("structured.jsonl", "text.jsonl", "rejects.jsonl"):
            os.replace(tmps[name], paths[name])
    finally:
        for t in tmps.values():
            if os.path.exists(t):
                os.remove(t)
    return {
        "inputs_seen": len(jobs),
        "documents_kept": kept,
        "rejected": sum(reasons.values()),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "characters": chars,
        "headings_per_document": {
            "mean": round(sum(headings) / len(headings), 3) if headings else 0.0,
            "min": min(headings, default=0), "max": max(headings, default=0),
        },
        "spans_by_kind": dict(sorted(kinds.items())),
    }
