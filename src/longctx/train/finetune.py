"""Finetuning (or training from scratch) on a registered task with the one trainer
(``longctx.train.trainer``): exact resume, atomic checkpoints, NaN stop, DDP and bf16 as in pretraining.

The config is built as DEFAULTS <- the task's ``CONFIG`` <- the user's file <- ``KEY=VALUE`` overrides;
``task.*`` keys are the task's options (checked against its ``OPTIONS``). With ``init_from`` the
model (architecture and weights) and its tokenizer come from that folder and ``model.*`` is replaced
by the saved fields, so run_config.json records what was really trained.

The run folder is the trainer's; ``results.json`` gets the dev metrics (``eval``) and, added here, the
test metrics (``test``) of the final model, both with their 95% intervals.
"""
from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

from longctx.errors import LongctxError
from longctx.io import write_json

# Imports of torch, transformers and of modules that import them stay inside the functions that use them:
# the CLI parser imports this module (finetune_cli) (`longctx --help` stays fast: tests/test_newcomer.py).

RULER_NAMES = ("ruler_niah_single", "ruler_niah_multikey", "ruler_niah_multivalue", "ruler_niah_multiquery",
               "ruler_vt", "ruler_cwe", "ruler_fwe", "ruler_qa")  # all in tasks/ruler.py
TASK_NAMES = ("qa", "qa_describe", "classification", "multiple_choice", "listops", "text", "retrieval", "section_heading",
              *RULER_NAMES)


def task_class(name: str):
    from longctx.tasks import get_task
    if name in TASK_NAMES:
        importlib.import_module(f"longctx.tasks.{'ruler' if name in RULER_NAMES else name}")
    return get_task(name)


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (update or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def saved_model_fields(path: str | Path) -> dict:
    """The ``model.*`` config keys of a saved model folder (what the trainer's config can hold)."""
    from longctx.train.config import DEFAULTS
    p = Path(path) / "config.json"
    if not p.exists():
        raise LongctxError(f"init_from {path} is not a saved model folder (no config.json)")
    saved = json.loads(p.read_text())
    out = {k: saved[k] for k in DEFAULTS["model"] if k in saved}
    if saved.get("model_type") == "longctx":
        # the attention in its explicit per-layer form: flat keys the config section may not declare
        # (``block`` of a blocks model) would otherwise be lost and fall back to their defaults
        from longctx.models import LongctxConfig
        mc = LongctxConfig.from_pretrained(str(path))
        out["attention"] = [{"type": name, **fields} for name, fields, _ in mc.layer_attention()]
    return out


def _seq_len_for(raw: dict, asked: int | None, init_from) -> int | None:
    """data.seq_len of a finetuning from a saved model: the task's default, shortened to the positions
    the model has (learned or sinusoidal tables); a length the user asks for beyond them is refused."""
    from longctx.train.config import DEFAULTS

    m = raw["model"]
    default = (raw.get("data") or {}).get("seq_len", DEFAULTS["data"]["seq_len"])
    if m.get("position", DEFAULTS["model"]["position"]) not in ("learned", "sinusoidal"):
        return asked or default
    limit = m.get("max_position_embeddings", DEFAULTS["model"]["max_position_embeddings"])
    if asked is None:
        return min(default, limit)
    if isinstance(asked, int) and asked > limit:
        raise LongctxError(f"data.seq_len={asked} is longer than the {limit} positions of init_from {init_from} "
                           f"(its {m.get('position', 'learned')} position table; model.* keys cannot change a saved "
                           f"model); use data.seq_len={limit} or less, or leave data.seq_len out")
    return asked


def finetune_config(task_name: str, config: dict | None = None, overrides: list[str] | None = None,
                    init_from: str | None = None) -> dict:
    from longctx.tasks.common import task_options
    from longctx.train.config import parse_overrides, resolve

    cls = task_class(task_name)
    raw = deep_merge(cls.CONFIG, config or {})
    raw = deep_merge(raw, parse_overrides(overrides or []))
    task_section = raw.pop("task", None) or {}
    if not isinstance(task_section, dict):
        raise LongctxError("config key 'task' must be a mapping of task options")
    init_from = init_from or raw.get("init_from")
    if init_from:
        raw["init_from"] = str(init_from)
        raw["model"] = deep_merge(raw.get("model") or {}, saved_model_fields(init_from))
        user_data = deep_merge(config or {}, parse_overrides(overrides or [])).get("data") or {}
        raw["data"] = dict(raw.get("data") or {}, seq_len=_seq_len_for(raw, user_data.get("seq_len"), init_from))
    raw.setdefault("name", task_name)
    objective = cls.objective_for(task_section)  # e.g. clm for a RULER task's generation form
    if objective:
        if raw.get("objective", objective) != objective:
            raise LongctxError(f"task {task_name!r} with these task options trains objective={objective}, not "
                               f"objective={raw['objective']}; use objective={objective} or leave objective out")
        raw["objective"] = objective
    cfg = resolve(raw)
    cfg["task"] = task_options(cls, task_section)
    return cfg


def run_finetune(cfg: dict, task_name: str, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train, then evaluate the final model on the test split; returns results.json's content."""
    from longctx.train.trainer import train

    task = task_class(task_name)(cfg)
    out = Path(out_dir)
    result = train(cfg, task, out, resume=resume, progress=progress)
    if "test" not in result:  # a run finished earlier but killed before this line gets it now
        if not hasattr(task, "splits"):
            task.prepare()
        model = task.model_class.from_pretrained(out / "model", trust_remote_code=False)
        result["test"] = task.evaluate(model, "test", seq_len=cfg["data"]["seq_len"])
        result["primary_metric"] = task.primary_metric
        result["from_scratch"] = not cfg.get("init_from")
        write_json(out / "results.json", result)
    return result


def summary_line(result: dict) -> str:
    m = result.get("primary_metric", "")
    parts = []
    for split in ("eval", "test"):
        ev = result.get(split) or {}
        if m in ev:
            lo, hi = ev.get(f"{m}_ci", [float("nan")] * 2)
            parts.append(f"{'dev' if split == 'eval' else 'test'} {m} {ev[m]:.3f} [{lo:.3f}, {hi:.3f}]")
    return "; ".join(parts)
