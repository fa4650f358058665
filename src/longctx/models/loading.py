"""Loading a saved longctx model folder that a user names (``init_from``, ``longctx eval``), safely.

Use ``load_longctx_model(path, cls)`` wherever a user gives a model folder, instead of
``cls.from_pretrained(path)`` or ``AutoConfig.from_pretrained(path)``:

- it never runs code from the folder: the folder's ``config.json`` is read as JSON by us, and Hugging
  Face is called with ``trust_remote_code=False`` and ``local_files_only=True`` (an ``auto_map`` beside a
  .py file neither prompts nor is copied into the modules cache);
- it refuses a folder that is not a longctx model (``model_type`` other than ``longctx``, e.g. a BERT
  folder): loaded as a longctx class, such a folder would give a model of freshly initialised weights
  and a run that ends with exit 0 having learned nothing from it;
- it refuses a folder whose weights lack part of the encoder, or a causal model loaded as an encoder
  (and the reverse), with one sentence.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers.utils import logging as hf_logging

from longctx.errors import LongctxError
from longctx.models.modeling import LongctxForCausalLM, LongctxForMaskedLM

log = logging.getLogger("longctx.models")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_longctx_config(path: str | os.PathLike, what: str = "model folder") -> dict:
    """``config.json`` of the longctx model folder ``path`` as a plain dict (read as JSON: nothing in the
    folder is imported), or LongctxError naming what is wrong."""
    p = Path(path)
    if not p.is_dir():
        raise LongctxError(f"{what} {str(p)!r} is not a folder; give a saved longctx model folder "
                           "(from `longctx pretrain` or `longctx convert`)")
    f = p / "config.json"
    if not f.is_file():
        raise LongctxError(f"{what} {str(p)!r} is not a saved model folder (no config.json)")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LongctxError(f"{str(f)!r} is not valid UTF-8 JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise LongctxError(f"{str(f)!r} must hold a JSON object")
    kind = cfg.get("model_type")
    if kind != "longctx":
        raise LongctxError(
            f"{what} {str(p)!r} holds a {kind!r} model, not a longctx model; convert it first "
            "(`longctx convert extend` for BERT/RoBERTa, `longctx convert longformer` for a Longformer)")
    return cfg


def run_settings(model_dir: str | Path) -> dict:
    """What the model's training run recorded (``run_config.json`` beside or above the model folder)."""
    p = Path(model_dir)
    for cand in (p / "run_config.json", p.parent / "run_config.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    return {}


def load_longctx_model(path: str | os.PathLike, cls=None, what: str = "model folder", **config_overrides):
    """The longctx model saved in folder ``path``, as ``cls`` (a longctx model class; default: the
    causal LM for a causal config, else the masked LM), in eval mode, or LongctxError (one sentence).

    ``what`` names the input in messages (e.g. ``"init_from"``); ``config_overrides`` go to
    ``from_pretrained`` (e.g. ``num_labels`` for a fresh classification head)."""

    cfg = read_longctx_config(path, what)
    causal = bool(cfg.get("causal", False))
    if cls is None:
        cls = LongctxForCausalLM if causal else LongctxForMaskedLM
    if (cls is LongctxForCausalLM) != causal:
        kind = "a causal LM" if causal else "a bidirectional encoder"
        need = "objective=clm" if causal else "objective=mlm"
        raise LongctxError(f"{what} {str(path)!r} holds {kind}, which cannot be loaded as {cls.__name__}; "
                           f"use {need} or another model")
    p = Path(path)
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise LongctxError(f"{what} {str(p)!r} has a config but no weights (model.safetensors); give a "
                           "complete model folder")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists what _check_complete says in one line
    try:
        model, info = cls.from_pretrained(str(p), local_files_only=True, trust_remote_code=False,
                                          output_loading_info=True, **config_overrides)
    except LongctxError as e:
        raise LongctxError(f"{what} {str(p)!r}: {e}") from None
    except Exception as e:  # a truncated or mismatched weights file, a malformed config field, ...
        if "mismatched_sizes" in str(e):
            first = "its weights do not have the shapes its config.json gives"
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LongctxError(f"cannot load {what} {str(p)!r} as {cls.__name__} ({first})") from None
    finally:
        hf_logging.set_verbosity(level)
    _check_complete(model, info, p, what)
    return model.eval()


def _check_complete(model, info: dict, path: Path, what: str) -> None:
    """Refuse weights that leave part of the encoder freshly initialised; a missing task head (a base
    model continued as a masked LM) is only logged."""
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    missing = [k for k in info.get("missing_keys", []) if k not in tied]
    prefix = model.base_model_prefix + "."
    encoder = [k for k in missing if k.startswith(prefix) or not hasattr(model, model.base_model_prefix)]
    if encoder:
        raise LongctxError(f"{what} {str(path)!r} lacks {len(encoder)} encoder weights (e.g. {encoder[0]}); "
                           "its weights file is incomplete or belongs to another model")
    if missing:
        log.warning("%s %s has no weights for %s: they start freshly initialised", what, path,
                    ", ".join(sorted(missing)))
