"""One run of a comparison in its own process: a variant's pretraining or one of its finetunings.

Every run is a process forked from a zygote that has imported torch, transformers and longctx's trainer
and done nothing else (multiprocessing's forkserver with those modules preloaded; started once per
driver process, then each run starts in a fraction of a second instead of the seconds an interpreter
spends importing). What a run computes cannot depend on what ran before it in the comparison (which
variants were trained, skipped as finished, or resumed: the state of allocators, loaded kernels, caches
and random generators), since the zygote never runs any of it, and its peak memory is its own. The
driver's environment and working folder at the start of each run are the run's (the zygote's, taken when
it started, are replaced), and its output goes to the driver's stderr at that moment or to the run's log.

Resumes from DIR's last checkpoint if there is one. A user error is written to DIR/error.txt (the
parent reports it) and the exit code is 2.

Ctrl-C is the parent's to pass on. The terminal sends SIGINT to the parent, the zygote and the child
alike; the zygote and the child ignore it (the zygote is started with SIGINT ignored, which its children
keep) and the child stops on the parent's SIGUSR1 instead, so that it is told once: it finishes its step,
saves a checkpoint and exits with 130 while the parent waits for it (``subprocess.run`` would kill it
0.25 s after the interrupt, before a long step or a large checkpoint is done). A second Ctrl-C kills
the child. SIGUSR1 stays blocked from the fork until the child has its handler, so that an early
request is taken, not fatal. SIGTERM (a scheduler's stop: SLURM sends it to every process of the job, then
SIGKILL some seconds later) is the same: the parent takes it as a Ctrl-C and the children ignore it, so that
each child is asked once, by the parent's SIGUSR1 (a child that took SIGTERM itself as well would read the
SIGUSR1 as a second request and stop without its checkpoint).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import reduction
from pathlib import Path

from longctx.errors import LongctxError
from longctx.train.finetune import run_finetune

# Imports of modules that import torch stay inside the functions that use them (a run's process has them preloaded): a comparison's driver
# process imports no torch (its runs do, in their zygote: experiments/variant.py).


@dataclass
class Child:
    """One run to make in its own process: ``cfg`` (a pretraining, or a finetuning on ``task``) in ``out_dir``;
    ``what`` names it in messages."""
    cfg: dict
    out_dir: Path
    what: str
    task: str | None = None


def run_children(children: list[Child], jobs: int, progress: bool) -> list[dict]:
    """Each child's results.json, in order, with up to ``jobs`` children at once.

    One at a time, a child prints its progress lines to stderr. Several at once, each writes them to
    ``log.txt`` in its folder, this process prints a line as each starts and ends, and each child gets
    ``cores // jobs`` threads (unless OMP_NUM_THREADS is set): on a small CPU model two single-thread runs
    side by side do more work than one run on two threads. A child's failure stops new starts; the running
    ones finish, then it is raised. Ctrl-C asks every running child to save a checkpoint (``stop_children``)."""
    results: list[dict | None] = [None] * len(children)
    queue, running, failed = list(enumerate(children)), {}, None
    # SIGTERM as Ctrl-C (where nothing else took it: the module's docstring)
    old_term = signal.getsignal(signal.SIGTERM)
    if old_term == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
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
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if failed is not None:
        raise failed
    return results


# what the zygote imports once for every run (and nothing else: no computation, no threads)
PRELOAD = ["torch", "transformers", "longctx.train.loop", "longctx.train.finetune"]


def _context():
    """The forkserver context with PRELOAD (spawn where the platform has no forkserver: slower, the same)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


class _Fd:
    """A file descriptor handed to the child (sent over the zygote's socket, as multiprocessing sends a
    connection's); the child receives it as an int."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _received_fd, (reduction.DupFd(self.fd),)


def _received_fd(dup) -> int:
    return dup.detach()


class Run:
    """A started child: ``poll()`` / ``returncode`` (None while it runs), ``wait()``, ``send_signal``, ``kill``."""

    def __init__(self, process):
        self.process = process

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.process.pid, sig)

    def kill(self) -> None:
        self.process.kill()


def _start(child: Child, jobs: int, progress: bool) -> Run:
    out_dir = child.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out_dir, prefix=".tmp-cfg-", delete=False) as f:
        json.dump(child.cfg, f)
    argv = [f.name, str(out_dir)] + (["--task", child.task] if child.task else [])
    (out_dir / "error.txt").unlink(missing_ok=True)
    env = dict(os.environ)
    if jobs == 1:
        out = os.dup(_stderr_fd()) if progress else os.open(os.devnull, os.O_WRONLY)
        argv += [] if progress else ["--quiet"]
    else:
        out = os.open(out_dir / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        if progress:
            print(f"  start: {child.what}", file=sys.stderr, flush=True)
    try:
        return start_child(main, argv, env, out)
    finally:
        os.close(out)  # the child holds its own copy


def _collect(child: Child, returncode: int) -> dict:
    """The child's results.json, or its error as one sentence."""
    error_file = child.out_dir / "error.txt"
    if returncode != 0:
        log = child.out_dir / "log.txt"
        why = error_file.read_text().strip() if error_file.exists() else f"exit code {returncode}" + (
            f" (its output: {log})" if log.exists() else "")
        raise LongctxError(f"{child.what} failed: {why}")
    return json.loads((child.out_dir / "results.json").read_text())


def _stderr_fd() -> int:
    """The file descriptor behind sys.stderr; 2 where sys.stderr is not a file (a test's capture)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return 2


def start_child(target, argv: list[str], env: dict, out: int) -> Run:
    """``target(argv)`` (its return value the exit code) in a child forked from the zygote, with ``env`` as its
    environment, this process's working folder as its own, and ``out`` as its stdout and stderr. SIGINT and
    SIGTERM are ignored and SIGUSR1 blocked around the start, so that the zygote (started by the first call)
    is born with them and its children inherit them until ``main`` takes SIGUSR1."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        process = _context().Process(target=_child_main, args=(target, argv, env, os.getcwd(), _Fd(out)),
                                     name="longctx-run")
        process.start()
        return Run(process)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old)


def _child_main(target, argv: list[str], env: dict, cwd: str, out: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # also where the platform spawns instead of forking
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    threads = env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        import torch
        torch.set_num_threads(int(threads))
    sys.exit(target(argv))


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


def main(argv: list[str]) -> int:
    """The run ``argv`` names (CFG.json DIR [--task NAME] [--quiet]); its exit code."""
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
