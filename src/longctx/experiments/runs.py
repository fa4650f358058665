"""One run of a comparison (a pretraining or a finetuning), reused only when it is the run asked for.

A comparison reruns into the same folder to resume or to add variants, so a finished run is normally
skipped. It may be skipped only when the config it was trained with equals the config the comparison would
run now: ``requested.json`` in the run folder holds what the comparison asked for (the run config, plus
``after``: the identity of what it starts from: the corpus's sha256 for a pretraining, the pretraining's
fingerprint for a finetuning, so a run on other text or from a retrained model is stale too). A finished or interrupted run asked for with another config is refused with the keys that
differ, or, with ``rerun_changed``, deleted and run again.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from longctx.errors import LongctxError
from longctx.io import write_json

REQUESTED = "requested.json"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict, new: dict) -> list[str]:
    """``key (old -> new)`` for every dotted key whose value differs."""
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(new)))
    return [f"{k} ({json.dumps(a.get(k, '<unset>'))} -> {json.dumps(b.get(k, '<unset>'))})"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def fingerprint(requested: dict) -> str:
    """A short identity of a requested run (what a run that starts from it records in ``after``)."""
    import hashlib
    return hashlib.sha256(json.dumps(requested, sort_keys=True).encode()).hexdigest()[:16]


def run_or_reuse(cfg: dict, out_dir: Path, what: str, progress: bool, *, task: str | None = None,
                 after: str | None = None, rerun_changed: bool = False) -> dict:
    """``cfg`` run in ``out_dir`` (pretraining, or finetuning on ``task``) in its own process; its results.json.
    ``what`` names the run in messages; ``after`` is the identity of what it starts from (module docstring)."""
    from longctx.experiments.variant import run_isolated

    requested = {"config": cfg, "after": after}
    saved_path = out_dir / REQUESTED
    started = (out_dir / "results.json").exists() or (out_dir / "run_config.json").exists()
    if started:
        saved = json.loads(saved_path.read_text()) if saved_path.exists() else None
        changes = ["(no requested.json: a run of an older longctx)"] if saved is None else config_diff(saved, requested)
        if changes and not rerun_changed:
            shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            raise LongctxError(f"{what} in {out_dir} was {'trained' if (out_dir / 'results.json').exists() else 'started'} "
                               f"with another config ({shown}); rerun with --rerun-changed to train it again with "
                               "this one, or use another --out")
        if changes:
            if progress:
                print(f"  {what}: config changed, training it again ({len(changes)} key(s) differ)", file=sys.stderr)
            shutil.rmtree(out_dir)
        elif (out_dir / "results.json").exists():
            if progress:
                print(f"  {what}: finished earlier, skipped", file=sys.stderr)
            return json.loads((out_dir / "results.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(saved_path, requested)
    return run_isolated(cfg, out_dir, progress, task=task)
