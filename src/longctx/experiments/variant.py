"""One run of a comparison in its own process: a variant's pretraining
(``python -m longctx.experiments.variant CFG.json DIR``) or one of its finetunings (``... --task NAME``).

Every run starts from a fresh interpreter, so what it computes cannot depend on what ran before it in the
comparison (which variants were trained, skipped as finished, or resumed: the state of allocators,
loaded kernels, caches and random generators), and its peak memory is its own.

Resumes from DIR's last checkpoint if there is one. A user error is written to DIR/error.txt (the
parent reports it) and the exit code is 2.

Ctrl-C is the parent's to pass on. The terminal sends SIGINT to the parent and the child alike; the child
ignores it and stops on the parent's SIGUSR1 instead, so that it is told once: it finishes its step,
saves a checkpoint and exits with 130 while the parent waits for it (``subprocess.run`` would kill it
0.25 s after the interrupt, before a long step or a large checkpoint is done). A second Ctrl-C kills
the child.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from longctx.errors import LongctxError


@dataclass
class Child:
    """One run to make in its own process: ``cfg`` (a pretraining, or a finetuning on ``task``) in ``out_dir``;
    ``what`` names it in messages."""
    cfg: dict
    out_dir: Path
    what: str
    task: str | None = None


def run_isolated(cfg: dict, out_dir: Path, progress: bool, task: str | None = None) -> dict:
    """Run ``cfg`` (pretraining, or finetuning on ``task``) in a child process; its results.json."""
    what = f"finetuning {cfg['name']!r} on {task}" if task else f"variant {cfg['name']!r}"
    return run_children([Child(cfg, out_dir, what, task)], 1, progress)[0]


def run_children(children: list[Child], jobs: int, progress: bool) -> list[dict]:
    """Each child's results.json, in order, with up to ``jobs`` children at once.

    One at a time, a child prints its progress lines to stderr. Several at once, each writes them to
    ``log.txt`` in its folder, this process prints a line as each starts and ends, and each child gets
    ``cores // jobs`` threads (unless OMP_NUM_THREADS is set): on a small CPU model two single-thread runs
    side by side do more work than one run on two threads. A child's failure stops new starts; the running
    ones finish, then it is raised. Ctrl-C asks every running child to save a checkpoint (``wait_for_child``)."""
    results: list[dict | None] = [None] * len(children)
    queue, running, failed = list(enumerate(children)), {}, None
    try:
        while running or (queue and failed is None):
            while queue and failed is None and len(running) < jobs:
                i, child = queue.pop(0)
                running[_start(child, jobs, progress)] = (i, child, time.perf_counter())
            done = [p for p in running if p.poll() is not None]
            if not done:
                time.sleep(0.05)
                continue
            for proc in done:
                i, child, t0 = running.pop(proc)
                try:
                    results[i] = _collect(child, proc.returncode)
                except LongctxError as e:
                    failed = failed or e
                    continue
                if progress and jobs > 1:
                    print(f"  done: {child.what} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        stop_children([p for p in running], ", ".join(c.what for _, c, _ in running.values()))
    if failed is not None:
        raise failed
    return results


def _start(child: Child, jobs: int, progress: bool) -> subprocess.Popen:
    out_dir = child.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out_dir, prefix=".tmp-cfg-", delete=False) as f:
        json.dump(child.cfg, f)
    cmd = [sys.executable, "-m", "longctx.experiments.variant", f.name, str(out_dir)]
    cmd += ["--task", child.task] if child.task else []
    (out_dir / "error.txt").unlink(missing_ok=True)
    env = None
    if jobs == 1:
        out = sys.stderr if progress else subprocess.DEVNULL
        cmd += [] if progress else ["--quiet"]
    else:
        out = open(out_dir / "log.txt", "a")
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        if progress:
            print(f"  start: {child.what}", file=sys.stderr, flush=True)
    try:
        proc = start_child(cmd, stdout=out, stderr=subprocess.STDOUT if jobs > 1 else (None if progress else out),
                           env=env)
    finally:
        if jobs > 1:
            out.close()  # the child holds its own copy
    return proc


def _collect(child: Child, returncode: int) -> dict:
    """The child's results.json, or its error as one sentence."""
    error_file = child.out_dir / "error.txt"
    if returncode != 0:
        why = error_file.read_text().strip() if error_file.exists() else f"exit code {returncode}"
        raise LongctxError(f"{child.what} failed: {why}")
    return json.loads((child.out_dir / "results.json").read_text())


def start_child(cmd: list[str], **popen_args) -> subprocess.Popen:
    """``cmd`` started with the terminal's SIGINT ignored and SIGUSR1 held until the child takes it
    (``main``), so that an interrupt sent during its imports is not lost: the ignored disposition and the
    signal mask pass through exec (set here around the start, not in a preexec_fn, which is unsafe with
    threads)."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        return subprocess.Popen(cmd, **popen_args)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGINT, old)


def wait_for_child(proc: subprocess.Popen, what: str) -> int:
    """The exit code of ``proc`` (started by ``start_child``); on Ctrl-C, ``stop_children``."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_children([proc], what)


def stop_children(procs: list, what: str) -> None:
    """After a Ctrl-C: ask each child to stop at a checkpoint and wait for them; kill them on a second
    Ctrl-C; then raise KeyboardInterrupt."""
    try:  # the request and its message inside: a second Ctrl-C arriving at once still kills the children
        for proc in procs:
            proc.send_signal(signal.SIGUSR1)
        print(f"interrupted: {what} {'is' if len(procs) == 1 else 'are'} saving a checkpoint after the current step; "
              "rerunning the same command resumes from it (Ctrl-C again stops without saving)", file=sys.stderr, flush=True)
        for proc in procs:
            proc.wait()
    except KeyboardInterrupt:
        for proc in procs:
            proc.kill()
            proc.wait()
        print(f"second interrupt: {what} stopped without saving; rerunning the same command resumes from the last "
              "saved checkpoint", file=sys.stderr, flush=True)
    raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg_path, out_dir = argv[0], Path(argv[1])
    quiet = "--quiet" in argv
    task = argv[argv.index("--task") + 1] if "--task" in argv else None
    from longctx.train.checkpoint import checkpoint_dirs
    cfg = json.loads(Path(cfg_path).read_text())
    Path(cfg_path).unlink(missing_ok=True)  # the parent's handover, read (a .tmp- file: a kill before this is cleaned)
    try:
        # the parent's interrupt (see the module's docstring); one sent during the imports is taken here
        signal.signal(signal.SIGUSR1, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        if task:
            from longctx.train.finetune import run_finetune
            run_finetune(cfg, task, out_dir, resume=True, progress=not quiet)
        else:
            from longctx.train.loop import pretrain
            pretrain(cfg, out_dir, resume=bool(checkpoint_dirs(out_dir)), progress=not quiet)
    except LongctxError as e:
        (out_dir / "error.txt").write_text(str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
