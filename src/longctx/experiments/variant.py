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
from pathlib import Path

from longctx.errors import LongctxError


def run_isolated(cfg: dict, out_dir: Path, progress: bool, task: str | None = None) -> dict:
    """Run ``cfg`` (pretraining, or finetuning on ``task``) in a child process; its results.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out_dir, delete=False) as f:
        json.dump(cfg, f)
        cfg_path = f.name
    cmd = [sys.executable, "-m", "longctx.experiments.variant", cfg_path, str(out_dir)]
    cmd += ["--task", task] if task else []
    cmd += [] if progress else ["--quiet"]
    error_file = out_dir / "error.txt"
    error_file.unlink(missing_ok=True)
    what = f"finetuning {cfg['name']!r} on {task}" if task else f"variant {cfg['name']!r}"
    try:
        returncode = wait_for_child(start_child(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                                                stderr=None if progress else subprocess.DEVNULL), what)
    finally:
        os.unlink(cfg_path)
    if returncode != 0:
        why = error_file.read_text().strip() if error_file.exists() else f"exit code {returncode}"
        raise LongctxError(f"{what} failed: {why}")
    return json.loads((out_dir / "results.json").read_text())


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
    """The exit code of ``proc`` (started by ``start_child``); on Ctrl-C, asks it to stop at a
    checkpoint and waits for it, kills it on a second Ctrl-C, then raises KeyboardInterrupt."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        pass
    try:  # the request and its message inside: a second Ctrl-C arriving at once still kills the child
        proc.send_signal(signal.SIGUSR1)
        print(f"interrupted: {what} is saving its checkpoint after its current step; rerunning the same command "
              "resumes from it (Ctrl-C again stops it without saving)", file=sys.stderr, flush=True)
        proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        print(f"second interrupt: {what} stopped without saving; rerunning the same command resumes it from its "
              "last saved checkpoint", file=sys.stderr, flush=True)
    raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg_path, out_dir = argv[0], Path(argv[1])
    quiet = "--quiet" in argv
    task = argv[argv.index("--task") + 1] if "--task" in argv else None
    from longctx.train.checkpoint import checkpoint_dirs
    cfg = json.loads(Path(cfg_path).read_text())
    try:
        # the parent's interrupt (see the module's docstring); one sent during the imports is taken here
        signal.signal(signal.SIGUSR1, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        if task:
            from longctx.tasks.finetune import run_finetune
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
