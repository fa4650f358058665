"""Checkpoints: written atomically (a temporary folder, then one rename), loaded without pickle.

A checkpoint folder ``checkpoints/step-000120/`` holds the model (``save_pretrained``: safetensors and
config.json), ``optimizer.pt`` and ``scheduler.pt`` (loaded with ``torch.load(weights_only=True)``),
``rng.pt`` (random states) and ``state.json`` (step, data position, tokens seen, elapsed time). Only the
last ``keep_last`` are kept.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from longctx.errors import LongctxError


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists())


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(), "numpy": _np_state(), "python": _py_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(out_dir)[:-max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and random states in place; returns the saved state."""
    path = Path(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
        if unexpected or set(missing) - tied:
            raise LongctxError(f"checkpoint {path} does not match the model (missing {sorted(missing)[:3]}, "
                               f"unexpected {sorted(unexpected)[:3]}); was the config changed?")
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except (OSError, RuntimeError, ValueError, json.JSONDecodeError) as e:
        raise LongctxError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); "
                           "remove it to resume from the one before") from None
    torch.set_rng_state(rng["torch"])
    np.random.set_state(_np_unstate(rng["numpy"]))
    random.setstate(_py_unstate(rng["python"]))
    return state


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
