"""Where longctx keeps files it can rebuild (one place, so every cache moves with one variable)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$LONGCTX_CACHE`` or ``~/.cache/longctx``: corpora, tokenizers and token streams built on demand."""
    env = os.environ.get("LONGCTX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "longctx"
