"""Pretraining (masked or causal LM): the entry point kept for callers, on the one trainer
(``longctx.train.trainer``) with the LM tasks (``longctx.tasks.mlm`` / ``clm``).

Reproducible by construction: batch k (its blocks and its masked positions) depends only on
(seed, k, rank), so a checkpoint stores just the step; ``resume=True`` continues from the last intact
one and ends bit-identical to a run that was never stopped (one process, CPU, same seed).
"""
from __future__ import annotations

from pathlib import Path

from longctx.data.collate import CLMCollator
from longctx.errors import LongctxError
from longctx.tasks.mlm import lm_loss
from longctx.train.trainer import task_for, train


def set_windows(model, window) -> None:
    """Staged training: give every sliding-window layer a new one-sided window (int or one per layer).

    The config is the source of truth: its attention becomes the explicit per-layer list of what the
    layers now run, and each layer is rebuilt from it, so a saved model reloads with exactly the
    pattern it was trained with (a ``window_schedule`` or flat ``window`` can no longer disagree)."""

    cfg, layers = model.config, model.longctx.layers
    windows = window if isinstance(window, list) else [window] * len(layers)
    if len(windows) != len(layers):
        raise LongctxError(f"a per-layer window list needs {len(layers)} values, got {len(windows)}")
    entries = []
    for layer, w, (name, fields, causal) in zip(layers, windows, cfg.layer_attention()):
        entry = dict(fields, type=name)
        if causal != cfg.causal:
            entry["causal"] = causal
        if name == "sliding":
            entry["window"] = int(w)
            layer.attention.set_attention(entry)
        entries.append(entry)
    cfg.attention = entries
    cfg.window = window


def evaluate(model, dataset, collator, batches: int, batch_size: int, accelerator=None) -> dict:
    """Mean held-out loss over the first ``batches`` batches (fixed masks), and its perplexity; a
    LongctxError when they hold no predicted token."""
    return lm_loss(model, dataset, collator, batches, batch_size, accelerator.device if accelerator else None,
                   causal=isinstance(collator, CLMCollator))


def pretrain(cfg: dict, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train as configured; write checkpoints, logs, the final model and results.json into ``out_dir``."""
    return train(cfg, task_for(cfg), out_dir, resume=resume, progress=progress)
