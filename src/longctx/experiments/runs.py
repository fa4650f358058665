"""One run of a comparison (a pretraining or a finetuning), reused only when it is the run asked for.

A comparison reruns into the same folder to resume or to add variants, so a finished run is normally
skipped. It may be skipped only when the config it was trained with equals the config the comparison would
run now: ``requested.json`` in the run folder holds what the comparison asked for (the run config, plus
``after``: the identity of what it starts from: the corpus's sha256 for a pretraining, the pretraining's
fingerprint for a finetuning, so a run on other text or from a retrained model is stale too). A finished or interrupted run asked for with another config is refused with the keys that
differ, or, with ``rerun_changed``, deleted and run again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from longctx.errors import LongctxError
from longctx.experiments.variant import Child, run_children
from longctx.io import write_json
from longctx.train.config import dotted

REQUESTED = "requested.json"


def config_diff(saved: dict, new: dict) -> list[str]:
    """``key (old -> new)`` for every dotted key whose value differs. A key one side lacks and the other
    holds as null is no difference: an option a later longctx added, unset (its default is null), asks
    for the same run, so upgrading does not make finished runs stale."""
    a, b = dotted(json.loads(json.dumps(saved))), dotted(json.loads(json.dumps(new)))
    return [f"{k} ({json.dumps(a.get(k, '<unset>'))} -> {json.dumps(b.get(k, '<unset>'))})"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def fingerprint(requested: dict) -> str:
    """A short identity of a requested run (what a run that starts from it records in ``after``)."""
    return hashlib.sha256(json.dumps(requested, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Run:
    """A run the comparison asks for: ``cfg`` in ``dir`` (a finetuning when ``task`` is set), starting from
    ``after`` (module docstring); ``result`` is its results.json once reused or run."""
    cfg: dict
    dir: Path
    what: str
    task: str | None = None
    after: str | None = None
    result: dict | None = None

    @property
    def requested(self) -> dict:
        return {"config": self.cfg, "after": self.after}

    @property
    def identity(self) -> str:
        """What a run that starts from this one records as ``after``: the fingerprint of the config this run
        was trained with (its requested.json; the one asked for now where it has not started)."""
        saved = self.dir / REQUESTED
        return fingerprint(json.loads(saved.read_text()) if saved.exists() else self.requested)


def _reuse(run: Run, progress: bool, rerun_changed: bool) -> bool:
    """True when ``run`` finished earlier with the config asked for now (its result loaded); a finished or
    started run with another config is refused, or deleted with ``rerun_changed``."""
    out, saved_path = run.dir, run.dir / REQUESTED
    if not ((out / "results.json").exists() or (out / "run_config.json").exists()):
        return False
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else None
    changes = ["(no requested.json: a run of an older longctx)"] if saved is None else config_diff(saved, run.requested)
    if changes and not rerun_changed:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise LongctxError(f"{run.what} in {out} was {'trained' if (out / 'results.json').exists() else 'started'} "
                           f"with another config ({shown}); rerun with --rerun-changed to train it again with "
                           "this one, or use another --out")
    if changes:
        if progress:
            print(f"  {run.what}: config changed, training it again ({len(changes)} key(s) differ)", file=sys.stderr)
        shutil.rmtree(out)
        return False
    if not (out / "results.json").exists():
        return False  # started with this config: resumed
    if progress:
        print(f"  {run.what}: finished earlier, skipped", file=sys.stderr)
    run.result = json.loads((out / "results.json").read_text())
    return True


def run_all(runs: list[Run], jobs: int, progress: bool, rerun_changed: bool = False) -> None:
    """Every run's ``result``: reused when finished with the same config, else run in its own process, up to
    ``jobs`` at once (longctx.experiments.variant.run_children). Every stale run is checked before any starts."""

    todo = [r for r in runs if not _reuse(r, progress, rerun_changed)]
    for r in todo:
        r.dir.mkdir(parents=True, exist_ok=True)
        write_json(r.dir / REQUESTED, r.requested)
    for r, result in zip(todo, run_children([Child(r.cfg, r.dir, r.what, r.task) for r in todo], jobs, progress)):
        r.result = result
