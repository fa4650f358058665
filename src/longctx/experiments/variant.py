"""One variant of a comparison, in its own process: ``python -m longctx.experiments.variant CFG.json DIR``.

Resumes from DIR's last checkpoint if there is one. A user error is written to DIR/error.txt (the
parent reports it) and the exit code is 2; Ctrl-C saves a checkpoint and exits with 130.
"""
import json
import sys
from pathlib import Path

from longctx.errors import LongctxError


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg_path, vdir = argv[0], Path(argv[1])
    quiet = "--quiet" in argv
    from longctx.train.checkpoint import checkpoint_dirs
    from longctx.train.loop import pretrain
    cfg = json.loads(Path(cfg_path).read_text())
    try:
        pretrain(cfg, vdir, resume=bool(checkpoint_dirs(vdir)), progress=not quiet)
    except LongctxError as e:
        (vdir / "error.txt").write_text(str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
