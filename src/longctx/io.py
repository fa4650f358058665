"""Files written whole or not at all, and the small readers that go with them.

Every output of a long job (a checkpoint, a corpus, a tokenizer, a report) is first written beside
its final place under a ``.tmp-`` name and then renamed onto it: a rename within one folder is atomic
on POSIX, so a reader (or a run resumed after a kill) sees the old file or the new one, never half
of one; a folder being written is held by `lock_run`. The ``.tmp-`` prefix is what ``longctx.train.checkpoint.clean_temporaries`` removes after a kill.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from longctx.errors import LongctxError

# yaml is imported inside the functions that use it: the CLI parser imports this module.

TMP_PREFIX = ".tmp-"


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line (non-ASCII kept as is) to ``path`` atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSON-lines file; a line cut by a kill (or any unreadable line) is skipped, and
    a missing file has none. Light on purpose: reading a run's metrics.jsonl imports nothing else."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder onto ``final``. An old ``final`` is moved aside first (a kill in
    between leaves a ``.tmp-old-*`` folder, never a missing ``final`` and a half-written one), put
    back if the rename fails, and removed once the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def publish_dir(final: str | os.PathLike, replace: bool = True, prefix: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; when the block ends without an error it becomes
    ``final`` by a rename, on an error it is removed and ``final`` is left as it was.

    ``replace=False`` is for caches keyed by their content: when ``final`` already exists (another
    process published the same key first) the new folder is dropped and the existing one kept."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix or f"{TMP_PREFIX}{final.name}-"))
    try:
        yield tmp
        if replace:
            replace_dir(tmp, final)
        elif not final.exists():
            try:
                os.replace(tmp, final)
            except OSError:  # published meanwhile by another process (rename onto a non-empty folder)
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def yaml_value(text: str):
    """``text`` parsed as YAML, with YAML 1.2's numbers: ``1e-3`` is the float 0.001 (YAML 1.1, PyYAML's
    default, reads it as the string '1e-3', so ``lr: 1e-3`` would be refused as not a number)."""
    import yaml

    global _LOADER
    if _LOADER is None:
        class Loader(yaml.SafeLoader):
            pass
        Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
            r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
        _LOADER = Loader
    return yaml.load(text, Loader=_LOADER)


_LOADER = None


def load_yaml(path: str | os.PathLike, what: str = "config file", hint: str = "") -> dict:
    """A YAML file's top-level mapping (an empty file: ``{}``); a missing file, text that is not UTF-8,
    bad YAML or a top level that is not a mapping is a one-sentence ``LongctxError`` naming ``what``
    (``hint`` is added to the missing-file sentence)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LongctxError(f"{what} {p} does not exist{hint}")
    try:
        data = yaml_value(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LongctxError(f"{what} {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise LongctxError(f"{what} {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LongctxError(f"{what} {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def lock_run(out_dir: Path):
    """Take a run (or corpus) folder's advisory lock; returns the open lock file (keep it open while writing)."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise LongctxError(f"{out} is being written by another run (process {holder}); wait for it to end "
                           "or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f
