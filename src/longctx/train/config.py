"""Experiment configs: YAML files (read with yaml.safe_load), checked against typed defaults, with
command-line overrides written ``section.key=value`` (the value is parsed as YAML: ``train.steps=200``,
``model.window=[32,64]``, ``data.corpus=my_docs/``).

Every key must exist in the defaults below (or, under ``model``, be a LongctxConfig field); a value must
have the default's type (an int is accepted where a float is expected). Mistakes raise LongctxError with
the key named.
"""
from __future__ import annotations

import copy
import inspect
from pathlib import Path

import yaml

from longctx.errors import LongctxError

# None means "any type" (optional values).
DEFAULTS: dict = {
    "name": "run",
    "seed": 0,
    "objective": "mlm",  # mlm | clm
    "init_from": None,  # a saved longctx model folder to continue from (e.g. from `longctx convert`)
    "model": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "attention": "sliding",
        "window": 64,
        "position": "learned",
        "max_position_embeddings": 2048,
        "hidden_dropout_prob": 0.0,
    },
    "data": {
        "corpus": "default",  # "default" (Python's documentation), a folder, .jsonl, .parquet, .arrow
        "text_field": "text",
        "tokenizer": {"train": "bpe", "vocab_size": 8192},  # or "bytes", or a tokenizer.json / folder
        "seq_len": 2048,
        "valid_fraction": 0.05,
        "global_tokens": "none",  # none | first | headings
        "mlm_probability": 0.15,
    },
    "train": {
        "steps": 100,
        "batch_size": 2,
        "grad_accum": 1,
        "lr": 1e-3,
        "warmup_steps": 10,
        "schedule": "linear",  # linear | cosine | constant (after warm-up)
        "weight_decay": 0.01,
        "clip": 1.0,
        "bf16": False,
        "activation_checkpointing": False,
        "eval_every": 0,  # 0: evaluate at the end only
        "eval_batches": 8,
        "save_every": 50,
        "keep_last": 2,
        "log_every": 10,
    },
    # Longformer's staged training: a list of phases {steps, seq_len, window, lr}; or
    # {"preset": "double", "phases": 3}: each phase doubles length and window and halves the LR.
    "stages": None,
}

CHOICES = {
    "objective": ("mlm", "clm"),
    "data.global_tokens": ("none", "first", "headings"),
    "train.schedule": ("linear", "cosine", "constant"),
}


def _model_fields() -> set[str]:
    from longctx.models.config import LongctxConfig
    params = set(inspect.signature(LongctxConfig.__init__).parameters) - {"self", "kwargs"}
    return params | {"num_labels"}


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``, checking keys and types against DEFAULTS."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        path = f"{where}{key}"
        if where == "model.":
            if key not in _model_fields():
                raise LongctxError(f"unknown config key '{path}' (see LongctxConfig for the model fields)")
            out[key] = value
            continue
        default = _lookup(DEFAULTS, path)
        if isinstance(default, dict) and path != "data.tokenizer":
            if not isinstance(value, dict):
                raise LongctxError(f"config key '{path}' must be a mapping, got {value!r}")
            out[key] = merge(out.get(key) or {}, value, path + ".")
        else:
            out[key] = _check_type(path, default, value)
    return out




def _lookup(tree: dict, path: str):
    node = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            if path.startswith("model."):
                return None
            raise LongctxError(f"unknown config key '{path}'")
        node = node[part]
    return node


def _check_type(path: str, default, value):
    if path in CHOICES and value not in CHOICES[path]:
        raise LongctxError(f"config key '{path}' must be one of {', '.join(CHOICES[path])}, got {value!r}")
    # model.attention is a name, a dict {type: ...} or a list of them: the model config checks it
    if default is None or path in ("data.tokenizer", "model.attention"):
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise LongctxError(f"config key '{path}' expects {type(default).__name__}, got {value!r}")
    return value


def parse_overrides(items: list[str]) -> dict:
    """['train.steps=10', 'model.window=32'] -> nested dict, values parsed as YAML."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise LongctxError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise LongctxError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise LongctxError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LongctxError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def resolve(config: dict | None = None, overrides: list[str] | None = None) -> dict:
    """DEFAULTS <- config <- overrides, checked."""
    cfg = merge(DEFAULTS, config or {})
    cfg = merge(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    t, d = cfg["train"], cfg["data"]
    for key in ("steps", "batch_size", "grad_accum"):
        if t[key] < 1:
            raise LongctxError(f"config key 'train.{key}' must be >= 1, got {t[key]}")
    if not t["lr"] > 0:
        raise LongctxError(f"config key 'train.lr' must be > 0, got {t['lr']}")
    if d["seq_len"] < 2:
        raise LongctxError(f"config key 'data.seq_len' must be >= 2, got {d['seq_len']}")
    if not 0 < d["valid_fraction"] < 1:
        raise LongctxError("config key 'data.valid_fraction' must be between 0 and 1")
    m = cfg["model"]
    window = m.get("window", DEFAULTS["model"]["window"])
    windows = window if isinstance(window, list) else [window]
    if m.get("attention", "sliding") == "sliding" and max(windows) * 2 + 1 > d["seq_len"]:
        raise LongctxError(
            f"the window ({max(windows)} each side) is larger than the sequence (data.seq_len={d['seq_len']}); "
            "use a smaller model.window or full attention")
    if m.get("position", "learned") in ("learned", "sinusoidal") and \
            m.get("max_position_embeddings", 0) < _max_seq_len(cfg):
        raise LongctxError(
            f"model.max_position_embeddings={m.get('max_position_embeddings')} is shorter than the longest "
            f"sequence ({_max_seq_len(cfg)}); raise it or use relative positions")


def _max_seq_len(cfg: dict) -> int:
    return max([cfg["data"]["seq_len"]] + [s["seq_len"] for s in stage_list(cfg)])


def stage_list(cfg: dict) -> list[dict]:
    """The phases of staged training, each {steps, seq_len, window, lr}; [] when not staged."""
    stages = cfg.get("stages")
    if not stages:
        return []
    if isinstance(stages, dict):
        if stages.get("preset") != "double":
            raise LongctxError("config key 'stages' takes a list of phases or {preset: double, phases: N}")
        n = int(stages.get("phases", 3))
        steps = int(stages.get("steps", max(1, cfg["train"]["steps"] // n)))
        w0 = cfg["model"].get("window", 64)
        w0 = w0[0] if isinstance(w0, list) else w0
        return [{"steps": steps, "seq_len": cfg["data"]["seq_len"] * 2 ** i, "window": w0 * 2 ** i,
                 "lr": cfg["train"]["lr"] / 2 ** i} for i in range(n)]
    if not isinstance(stages, list):
        raise LongctxError("config key 'stages' must be a list of phases")
    out = []
    for i, s in enumerate(stages):
        if not isinstance(s, dict) or "steps" not in s:
            raise LongctxError(f"config key 'stages[{i}]' needs at least 'steps'")
        unknown = set(s) - {"steps", "seq_len", "window", "lr"}
        if unknown:
            raise LongctxError(f"config key 'stages[{i}]' has unknown keys {sorted(unknown)}")
        out.append({"steps": int(s["steps"]), "seq_len": int(s.get("seq_len", cfg["data"]["seq_len"])),
                    "window": s.get("window", cfg["model"].get("window")), "lr": float(s.get("lr", cfg["train"]["lr"]))})
    return out
