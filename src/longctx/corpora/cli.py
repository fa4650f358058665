"""`longctx corpus arxiv INPUT... --out DIR`: arXiv LaTeX sources -> structure-aware + text-only corpora.

Output folder:
  structured.jsonl  {"id", "title", "text", "structure": [{"kind", "level", "start", "end"}], "source", "main_file"}
  text.jsonl        {"id", "text"}: the same documents, same order, same text, no structure
  rejects.jsonl     {"input", "reason", "detail"}
  stats.json        inputs seen, documents kept, rejects by reason, characters, headings per document
  .state/journal.jsonl  one line per finished input (the resume record)
  .state/inputs.json    the inputs (keys) the finished corpus holds, in order
  .lock                 held while a run writes the folder: a second writer is refused

Every input's result is appended to the journal as soon as it is done; the four output files are then
rebuilt from the journal, in input order, each written to a temporary file and renamed. An interrupted
run leaves the previous outputs intact, and a rerun converts only the inputs the journal lacks (or whose
size or modification time changed), so two runs over the same inputs give byte-identical corpora.

A run into a finished corpus whose inputs lack some the corpus holds (other inputs, not the same folder
again or grown) would drop their documents: it is refused unless ``--append`` (the corpus keeps its
inputs and gains this run's; a paper with the same key is this run's version) or ``--overwrite`` (the
corpus becomes this run's inputs alone) says which is meant.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import signal
import time
from collections import Counter
from multiprocessing.connection import wait

from longctx.corpora.arxiv import Limits, Rejected, convert_source, discover, doc_id
from longctx.errors import LongctxError
from longctx.io import lock_run
from longctx.memory import proc_status_bytes
from longctx.progress import Progress

STATE_DIR = ".state"
JOURNAL = "journal.jsonl"
INPUTS = "inputs.json"
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
    a.add_argument("--max-memory-mb", type=float, default=Limits.max_memory_bytes / 2**20,
                   help="most MiB of memory one paper's conversion may use (beyond the worker's own)")
    a.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per paper")
    a.add_argument("--latin1-fallback", action="store_true",
                   help="decode non-UTF-8 files as Latin-1 instead of rejecting the paper")
    a.add_argument("--quiet", action="store_true", help="no progress on stderr")
    existing = a.add_mutually_exclusive_group()
    existing.add_argument("--append", action="store_true",
                          help="OUT holds a corpus of other inputs: keep its documents and add these")
    existing.add_argument("--overwrite", action="store_true",
                          help="OUT holds a corpus of other inputs: replace it by these inputs' corpus")
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
    for flag, value in (("--max-members", args.max_members), ("--max-mb", args.max_mb),
                        ("--max-text-mb", args.max_text_mb), ("--max-memory-mb", args.max_memory_mb),
                        ("--timeout", args.timeout)):
        if not value > 0 or value == float("inf"):  # `not >` also catches nan
            raise LongctxError(f"{flag} must be a positive number, got {value}.")
    limits = Limits(max_members=args.max_members, max_bytes=int(args.max_mb * 2**20),
                    max_text_bytes=int(args.max_text_mb * 2**20), latin1_fallback=args.latin1_fallback,
                    max_memory_bytes=int(args.max_memory_mb * 2**20))
    stats = build_arxiv_corpus(paths, out, workers=args.workers, limits=limits, timeout=args.timeout,
                               progress=not args.quiet, append=args.append, overwrite=args.overwrite)
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


def _work(job: tuple, converter=convert_source) -> dict:
    """Convert one input; never raises (a worker that raised would stop the pool)."""
    key, path, sig, limits, timeout = job
    entry = {"key": key, "sig": sig}
    use_alarm = timeout and hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        rec = converter(path, limits)
        missing = rec.pop("missing_inputs", None)
        if missing:
            entry["missing_inputs"] = missing[:100]
        entry["record"] = {"id": doc_id(key), **rec, "source": key}
    except Rejected as e:
        entry.update(reason=e.reason, detail=e.detail[:500])
    except _Timeout:
        entry.update(reason="timeout", detail=f"conversion took more than {timeout:g} s")
    except MemoryError:
        entry.update(reason="out-of-memory",
                     detail=f"conversion needed more than {limits.max_memory_bytes / 2**20:g} MiB")
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
                       timeout: float | None = 300.0, progress: bool = True, converter=convert_source,
                       append: bool = False, overwrite: bool = False) -> dict:
    """Convert every paper under ``inputs`` into the corpus files in ``out``; returns the stats.
    ``converter(path, limits) -> record`` is ``convert_source`` unless a test injects another.
    ``append`` / ``overwrite``: what to do with a finished corpus of other inputs in ``out``."""
    _check_paths(inputs, out)
    t0 = time.monotonic()
    try:
        jobs_all = discover(inputs)
    except OSError as e:
        raise LongctxError(f"cannot read the input {e.filename} ({e.strerror or e}); give folders and "
                           "files you can read.") from None
    out_abs = os.path.realpath(out)
    jobs_all = [(k, p) for k, p in jobs_all if not os.path.realpath(p).startswith(out_abs + os.sep)]
    if not jobs_all:
        raise LongctxError(f"no arXiv sources (.tar.gz, .tgz, .tar, .gz, .tex) found under {', '.join(inputs)}.")
    journal_path = os.path.join(out, STATE_DIR, JOURNAL)
    try:
        os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)  # before the lock: the folder is ours
        lock = lock_run(out)
    except OSError as e:
        raise LongctxError(f"cannot create the output folder {out} ({e.strerror or e}); give a folder "
                           "you can write to.") from None
    with lock:  # closing the lock file releases it, however the block ends
        keys = _corpus_keys(out, [k for k, _ in jobs_all], append, overwrite)
        index = _load_journal(journal_path)

        todo = []
        for key, path in jobs_all:
            sig = _signature(path)
            if key in index and index[key][1] == sig:
                continue
            todo.append((key, path, sig, limits, timeout))
        skipped = len(jobs_all) - len(todo)
        if todo:
            # the rate counts this run's papers; those already in the journal start the count
            with Progress(len(jobs_all), "corpus arxiv", "docs", enabled=progress, initial=skipped) as prog:
                try:
                    _convert_all(todo, journal_path, workers, converter, limits, prog)
                except OSError as e:  # the journal could not be appended (a full disk): its lines so far count
                    raise _write_error(out, e) from None
            index = _load_journal(journal_path)

        elapsed = time.monotonic() - t0
        run = {"processed": len(todo), "skipped": skipped, "workers": workers, "seconds": round(elapsed, 3),
               "docs_per_second": round(len(todo) / elapsed, 3) if elapsed > 0 else None}
        try:
            return _write_outputs(out, journal_path, index, keys, run)
        except OSError as e:
            raise _write_error(out, e) from None


def _corpus_keys(out: str, keys: list[str], append: bool, overwrite: bool) -> list[str]:
    """The inputs the corpus will hold: this run's, and with ``append`` the finished corpus's too; a
    run that would silently drop documents of the finished corpus is refused."""
    try:
        with open(os.path.join(out, STATE_DIR, INPUTS), encoding="utf-8") as f:
            held = json.load(f)
    except FileNotFoundError:
        return keys  # a new folder, or a run that never finished: nothing to drop
    if append:
        return sorted(set(held) | set(keys))
    dropped = sorted(set(held) - set(keys))
    if dropped and not overwrite:
        raise LongctxError(f"{out} holds a finished corpus of {len(held)} inputs, {len(dropped)} of which "
                           f"this run does not give (e.g. {dropped[0]}); add --append to add this run's "
                           "documents to it or --overwrite to replace it by this run's, or choose another --out.")
    return keys


def _convert_all(todo: list, journal_path: str, workers: int, converter, limits: Limits, prog) -> None:
    """Convert ``todo`` and append each entry to the journal as soon as it arrives."""
    with open(journal_path, "ab") as jf:
        if jf.tell() > 0:
            with open(journal_path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    jf.write(b"\n")  # a crash cut the last line: start clean after it
        for entry in _map(todo, workers, converter, limits.max_memory_bytes):
            line = (json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
            jf.write(line)
            jf.flush()
            prog.update(1)


def _write_error(out: str, e: OSError) -> LongctxError:
    return LongctxError(f"could not write the corpus in {out} ({e.strerror or e}); free space or fix "
                        "the folder and rerun: finished papers are kept and the previous outputs are intact.")


# A worker stuck in C code (a regex, the parser) cannot take SIGALRM; the parent kills it this much later.
_KILL_GRACE_S = 10.0
_TASKS_PER_WORKER = 500  # a fresh process now and then: fragmentation from big papers does not pile up


def _vm_size() -> int | None:
    """This process's address-space size in bytes (Linux), or None where /proc is absent."""
    return proc_status_bytes("VmSize")


def _limit_memory(budget: int) -> None:
    """Cap this process's address space at its current size plus ``budget`` bytes: an allocation past
    it raises MemoryError (caught: the paper is rejected) instead of waking the OOM killer."""
    try:
        pass
    except ImportError:  # not POSIX: only the estimate before parsing bounds memory
        return
    base = _vm_size()
    if base is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = base + budget
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def _worker_main(conn, converter, budget: int) -> None:
    """One worker process: receive a job, send back its journal entry, until told to stop (None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _limit_memory(budget)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        entry = _work(job, converter)
        conn.send(entry)
        if entry.get("reason") == "out-of-memory":
            return  # a fresh process for the next paper: this heap is fragmented to the cap


class _Worker:
    def __init__(self, ctx, converter, budget: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, converter, budget), daemon=True)
        self.proc.start()
        child.close()
        self.job, self.started, self.tasks = None, 0.0, 0

    def give(self, job) -> None:
        self.job, self.started = job, time.monotonic()
        self.tasks += 1
        self.conn.send(job)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _died(job: tuple, proc) -> dict:
    code = proc.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    return {"key": job[0], "sig": job[2], "reason": "worker-died",
            "detail": f"the worker converting it died ({how}), e.g. killed for memory"}


def _collect(w: "_Worker", ready: set) -> dict | None:
    """The journal entry of busy worker ``w`` once it answered, died or overran its timeout; else None."""
    if w.conn in ready:
        try:
            return w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(5)
            return _died(w.job, w.proc)
    if w.proc.sentinel in ready:
        w.proc.join(5)
        return _died(w.job, w.proc)
    timeout = w.job[4]
    if timeout and time.monotonic() - w.started > timeout + _KILL_GRACE_S:
        w.proc.kill()
        w.proc.join()
        return {"key": w.job[0], "sig": w.job[2], "reason": "timeout",
                "detail": f"conversion took more than {timeout:g} s"}
    return None


def _map(jobs: list, workers: int, converter=convert_source, memory: int = 1024 * 2**20):
    """Journal entries of ``jobs`` in completion order, from worker processes (even with one worker,
    so every paper gets the memory cap, and a crash or kill costs only that paper).

    The parent waits on each worker's pipe and its process sentinel together: a worker that dies
    (OOM killer, kill -9, a crash in C code) rejects its paper as ``worker-died`` and a fresh worker
    takes its place; one that overruns ``timeout`` by ``_KILL_GRACE_S`` (stuck where SIGALRM cannot
    reach) is killed and its paper rejected as ``timeout``."""

    # fork where there is one: a worker starts at once with the parent's imports (spawn re-imports
    # torch, ~4 s a worker); workers run only pure-Python conversion, never torch or its threads
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pending = list(reversed(jobs))
    pool: list[_Worker] = []
    try:
        while pending or any(w.job for w in pool):
            for w in [w for w in pool if w.job is None and (not pending or w.tasks >= _TASKS_PER_WORKER)]:
                pool.remove(w)
                w.stop()
            while pending and len(pool) < min(workers, len(jobs)):
                pool.append(_Worker(ctx, converter, memory))
            for w in list(pool):
                if w.job is None and pending:
                    job = pending.pop()
                    try:
                        w.give(job)
                    except OSError:  # it died while idle: the job was never tried, give it to another
                        pending.append(job)
                        pool.remove(w)
                        w.stop(kill=True)
            busy = [w for w in pool if w.job is not None]
            ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=1.0))
            for w in busy:
                entry = _collect(w, ready)
                if entry is None:
                    continue
                w.job = None
                if entry.get("reason") in ("out-of-memory", "worker-died", "timeout") or not w.proc.is_alive():
                    pool.remove(w)  # that process is gone or going: its successor starts clean
                    w.stop(kill=True)
                yield entry
    finally:
        for w in pool:
            w.stop(kill=w.job is not None)


def _write_outputs(out: str, journal_path: str, index: dict, keys: list[str], run: dict) -> dict:
    """Rebuild the four output files and the list of inputs from the journal. All are written to
    temporary files first and renamed only when every one is complete, so a failure (a full disk)
    leaves the old ones."""
    paths = {name: os.path.join(out, name) for name in OUTPUT_FILES}
    paths[INPUTS] = os.path.join(out, STATE_DIR, INPUTS)  # last: the corpus is finished once it is there
    tmps = {name: f"{p}.tmp.{os.getpid()}" for name, p in paths.items()}
    try:
        with open(journal_path, "rb") as jf, \
                open(tmps["structured.jsonl"], "w", encoding="utf-8", newline="\n") as fs, \
                open(tmps["text.jsonl"], "w", encoding="utf-8", newline="\n") as ft, \
                open(tmps["rejects.jsonl"], "w", encoding="utf-8", newline="\n") as fr:
            tally = _Tally()
            for key in keys:
                jf.seek(index[key][0])
                e = json.loads(jf.readline())
                tally.add(key, e)
                rec = e.get("record")
                if rec is None:
                    fr.write(json.dumps({"input": key, "reason": e["reason"], "detail": e.get("detail", "")},
                                        ensure_ascii=False) + "\n")
                    continue
                fs.write(json.dumps(rec, ensure_ascii=False) + "\n")
                ft.write(json.dumps({"id": rec["id"], "text": rec["text"]}, ensure_ascii=False) + "\n")
            stats = {**tally.stats(len(keys)), "run": run}
            for f in (fs, ft, fr):
                f.flush()
                os.fsync(f.fileno())
        with open(tmps["stats.json"], "w", encoding="utf-8", newline="\n") as f:
            json.dump(stats, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        with open(tmps[INPUTS], "w", encoding="utf-8") as f:
            json.dump(keys, f)
            f.flush()
            os.fsync(f.fileno())
        for name in paths:
            os.replace(tmps[name], paths[name])
    finally:
        for t in tmps.values():
            if os.path.exists(t):
                os.remove(t)
    return stats


class _Tally:
    """The numbers of ``stats.json``, gathered one journal entry at a time."""

    def __init__(self):
        self.reasons: Counter = Counter()
        self.kinds: Counter = Counter()
        self.headings: list[int] = []
        self.chars = self.kept = 0
        self.missing: dict[str, list[str]] = {}

    def add(self, key: str, e: dict) -> None:
        if e.get("missing_inputs"):
            self.missing[key] = e["missing_inputs"]
        rec = e.get("record")
        if rec is None:
            self.reasons[e["reason"]] += 1
            return
        self.kept += 1
        self.chars += len(rec["text"])
        self.headings.append(sum(s["kind"] not in ("title", "abstract") for s in rec["structure"]))
        self.kinds.update(s["kind"] for s in rec["structure"])

    def stats(self, inputs: int) -> dict:
        h = self.headings
        return {
            "inputs_seen": inputs,
            "documents_kept": self.kept,
            "rejected": sum(self.reasons.values()),
            "rejects_by_reason": dict(sorted(self.reasons.items())),
            "characters": self.chars,
            "headings_per_document": {
                "mean": round(sum(h) / len(h), 3) if h else 0.0, "min": min(h, default=0), "max": max(h, default=0),
            },
            "spans_by_kind": dict(sorted(self.kinds.items())),
            # \input/\include targets the source lacks: the paper was kept without them (the first 100
            # papers listed, with at most 100 names each)
            "missing_inputs": {"papers": len(self.missing),
                               "files": sum(len(v) for v in self.missing.values()),
                               "by_input": dict(list(sorted(self.missing.items()))[:100])},
        }
