"""Checkpoints and the run folder: atomic writes, checksums, one writer at a time.

A checkpoint folder ``checkpoints/step-000120/`` holds the model (``save_pretrained``: safetensors and
config.json), ``optimizer.pt`` and ``scheduler.pt`` (loaded with ``torch.load(weights_only=True)``),
``rng.pt`` (random states), ``state.json`` (step, tokens seen, elapsed time), ``run_config.json`` (the
experiment config it was trained with) and ``manifest.json`` (sha256 and size of every other file).

Every write goes to a ``.tmp-*`` folder first and becomes visible with one rename, so a killed run
leaves either the whole checkpoint or none of it; leftovers are removed at the next start. Resume
verifies the manifest and falls back to the newest intact checkpoint (a truncated or bit-flipped file
is caught by its checksum). Only the last ``keep_last`` are kept.

The run folder is locked (``fcntl.flock`` on ``.lock``) while a run writes it: a second writer is
refused; the kernel releases the lock when the process dies, however it dies.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from longctx.errors import LongctxError
from longctx.io import lock_run, publish_dir  # noqa: F401  (lock_run: the trainer takes it from here)
from longctx.train.config import dotted
from longctx.train.optim import keep_fused

MANIFEST = "manifest.json"
STATE_KEYS = ("step", "tokens", "train_time")


class CorruptCheckpoint(LongctxError):
    """A checkpoint whose files are missing, truncated or altered: resume falls back to an older one."""


# --- fault injection, for the kill and stop tests: LONGCTX_FAULT="point:n" SIGKILLs the n-th arrival at
# point, "point:n:SIGNAME" sends that signal instead (SIGTERM, SIGINT: a stop request at a known step);
# LONGCTX_FAULT_RANK=r limits it to the process of torch.distributed rank r (RANK, as torchrun sets it);
# LONGCTX_FAULT_DELAY="point:s" waits s seconds at every arrival (a checkpoint as slow as a large model's) ---
_arrivals: dict[str, int] = {}


def fault_point(name: str) -> None:
    point, _, seconds = os.environ.get("LONGCTX_FAULT_DELAY", "").rpartition(":")
    if point == name:
        time.sleep(float(seconds))
    spec = os.environ.get("LONGCTX_FAULT")
    if not spec:
        return
    point, n, *sig = spec.split(":")
    if point != name:
        return
    rank = os.environ.get("LONGCTX_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] == int(n):
        os.kill(os.getpid(), getattr(signal, sig[0]) if sig else signal.SIGKILL)


# --- the run folder ---
def clean_temporaries(out_dir: Path) -> list[Path]:
    """Remove the ``.tmp-*`` folders and files a killed run left (call with the lock held)."""
    out = Path(out_dir)
    removed = []
    for root in (out, out / "checkpoints"):
        if root.is_dir():
            for p in root.glob(".tmp-*"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# --- checkpoints ---
def checkpoint_dirs(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, state: dict, keep_last: int,
                    run_config: dict | None = None) -> Path:
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:06d}"
    with publish_dir(final, prefix=".tmp-") as tmp:
        fault_point("save.start")
        model.save_pretrained(tmp)
        fault_point("save.model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(), "numpy": _np_state(), "python": _py_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if run_config is not None:
            (tmp / "run_config.json").write_text(json.dumps(run_config, indent=1))
        fault_point("save.files")
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        fault_point("save.manifest")
    fault_point("save.renamed")
    for old in checkpoint_dirs(out_dir)[:-max(1, keep_last)]:
        # renamed first, so a kill during the removal never leaves a half-deleted step-* folder
        gone = old.with_name(f".tmp-del-{old.name}")
        os.replace(old, gone)
        fault_point("save.prune")
        shutil.rmtree(gone, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted, or None if every file matches its manifest."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "it has no checksum manifest"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest cannot be read ({type(e).__name__})"
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        if name not in manifest:
            return f"its manifest does not list {name}"
    for name, entry in manifest.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != entry.get("bytes"):
            return f"{name} has {size:,} bytes instead of {entry.get('bytes'):,} (truncated or altered)"
        if _sha256(p) != entry.get("sha256"):
            return f"{name} does not match its sha256 checksum (altered on disk)"
    return None


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and random states in place; returns the saved state.

    Raises CorruptCheckpoint when a file cannot be read (the caller falls back to an older checkpoint),
    LongctxError when the checkpoint is fine but belongs to another model."""
    path = Path(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
        optim_state = torch.load(path / "optimizer.pt", weights_only=True)
        sched_state = torch.load(path / "scheduler.pt", weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS) or not isinstance(state["step"], int):
            raise ValueError(f"state.json lacks {', '.join(STATE_KEYS)}")
    except Exception as e:  # noqa: BLE001 - any unreadable file (safetensors, pickle, JSON) means the same
        raise CorruptCheckpoint(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise LongctxError(f"checkpoint {path} does not match the model built from this config (missing "
                           f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); resume with the config "
                           "it was trained with")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    try:
        optimizer.load_state_dict(optim_state)
        keep_fused(optimizer)
        scheduler.load_state_dict(sched_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise LongctxError(f"the optimizer state in {path} does not match this model ({str(e)[:120]}); resume "
                           "with the config it was trained with") from None
    torch.set_rng_state(rng["torch"])
    np.random.set_state(_np_unstate(rng["numpy"]))
    random.setstate(_py_unstate(rng["python"]))
    return state


# --- the saved config: what a resume may change ---
# Keys that change neither the model nor the data nor the optimisation: a resume may change them.
SAFE_TO_CHANGE = {
    "name": "a label",
    "train.extend": "whether a resume may lengthen the run",
    "train.log_every": "logging", "train.eval_every": "evaluation cadence", "train.eval_batches": "evaluation size",
    "train.save_every": "checkpoint cadence", "train.keep_last": "checkpoints kept",
    "train.activation_checkpointing": "recomputation, same results",
}


def plain(cfg) -> dict:
    """The config as JSON values (tuples as lists, dataclasses as dicts), as it is saved."""
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    elif hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    return json.loads(json.dumps(cfg, default=str))


def config_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes a resume cannot take, changes it can), each written ``key (old -> new)``."""
    a, b = dotted(plain(saved), leaves=("data.tokenizer",)), dotted(plain(new), leaves=("data.tokenizer",))
    unsafe, safe = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        text = f"{key} ({json.dumps(a.get(key, '<unset>'))} -> {json.dumps(b.get(key, '<unset>'))})"
        ok = key in SAFE_TO_CHANGE or (key == "train.steps" and extends(a, b))
        (safe if ok else unsafe).append(text)
    return unsafe, safe


def extends(saved: dict, new: dict) -> bool:
    """Whether the new (flattened) config lengthens the run as asked: more train.steps with train.extend.
    train.steps sets the learning-rate schedule, so a resume never changes it unasked; with stages it
    sets the phase lengths too, the data."""
    return new.get("train.extend") is True and not new.get("stages") and \
        isinstance(new.get("train.steps"), int) and new["train.steps"] > saved.get("train.steps", new["train.steps"])


# numpy and python RNG states as plain tensors/lists, so weights_only loading accepts them
def _np_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}


def _np_unstate(s):
    return ("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"])


def _py_state():
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _py_unstate(s):
    return (s["version"], tuple(s["internal"]), s["gauss"])
