"""One run of a comparison in its own process: a variant's pretraining
(``python -m longctx.experiments.variant CFG.json DIR``) or one of its finetunings (``... --task NAME``).

Every run starts from a fresh interpreter, so what it computes cannot depend on what ran before it in the
comparison (which variants were trained, skipped as finished, or resumed: the state of allocators,
loaded kernels, caches and random generators), and its peak memory is its own.

Resumes from DIR's last checkpoint if there is one. A user error is written to DIR/error.txt (the
parent reports it) and the exit code is 2; Ctrl-C saves a checkpoint and exits with 130.
"""
from __future__ import annotations

import json
import os
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
    try:
        res = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                             stderr=None if progress else subprocess.DEVNULL)
    finally:
        os.unlink(cfg_path)
    if res.returncode == 130:
        raise KeyboardInterrupt
    if res.returncode != 0:
        why = error_file.read_text().strip() if error_file.exists() else f"exit code {res.returncode}"
        raise LongctxError(f"{'finetuning ' + repr(cfg['name']) if task else 'variant ' + repr(cfg['name'])} "
                           f"failed: {why}")
    return json.loads((out_dir / "results.json").read_text())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg_path, out_dir = argv[0], Path(argv[1])
    quiet = "--quiet" in argv
    task = argv[argv.index("--task") + 1] if "--task" in argv else None
    from longctx.train.checkpoint import checkpoint_dirs
    cfg = json.loads(Path(cfg_path).read_text())
    try:
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
