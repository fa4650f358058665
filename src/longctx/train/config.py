"""Experiment configs: YAML files (read with ``io.yaml_value``: safe, YAML 1.2 numbers) checked against typed declarations, with
command-line overrides written ``section.key=value`` (the value is parsed as YAML: ``train.steps=200``,
``model.window=[32,64]``, ``data.corpus=my_docs/``).

Each section is a dataclass below (``Experiment``, ``DataConfig``, ``TrainConfig``, the tokenizer and
stage specs); the ``model`` section is declared by ``LongctxConfig.__init__`` itself (its signature and
type annotations), so it follows the model. Every field carries its type, default, range and a help
string; ``longctx config show`` prints them. Types and ranges are checked by pydantic (strict: no
``8.5`` silently becoming ``8``, no ``"yes"`` becoming ``True``) from those declarations; what this module
adds is the walk over sections and longctx's one-sentence errors naming the key.

``resolve(config, overrides)`` returns the plain nested dict the rest of longctx reads
(``cfg["train"]["steps"]``): ``DEFAULTS`` <- config <- overrides, checked.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml

from longctx import io
from longctx.errors import LongctxError
from longctx.tasks.base import stage_list  # noqa: F401  (re-exported: the phases of staged training)

# Imports of transformers, pydantic and longctx.models stay inside the functions that use them: the CLI's
# config commands and a comparison's driver read and check configs without them.


def key(default=dataclasses.MISSING, help: str = "", **limits):
    """A declared config key: its default, a one-line help, and pydantic limits (ge, gt, lt, le)."""
    meta = {"help": help, "limits": limits}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------
# declarations
# ---------------------------------------------------------------------------------------------------
@dataclass
class TokenizerSpec:
    """``data.tokenizer`` as a mapping: a tokenizer trained on the corpus (cached)."""
    train: Literal["bpe", "wordpiece"] = key(help="algorithm of the tokenizer to train on the corpus")
    vocab_size: int = key(8192, "vocabulary size, special tokens included", ge=1)
    min_frequency: int = key(2, "a merge or word must occur this often to enter the vocabulary", ge=0)


@dataclass
class DataConfig:
    corpus: str = key("default", 'the text: "default" (Python\'s documentation), a folder of .txt/.md, a '
                                 ".jsonl, .parquet or .arrow file")
    text_field: str = key("text", "the field holding the text in JSONL/Parquet/Arrow records")
    tokenizer: Union[str, TokenizerSpec] = key({"train": "bpe", "vocab_size": 8192},
                                                "'bytes', a tokenizer.json or model folder, or {train: bpe|wordpiece, "
                                                "vocab_size: N} to train one on the corpus")
    seq_len: int = key(2048, "tokens per training sequence (the first phase's, when staged)", ge=2)
    valid_fraction: float = key(0.05, "fraction of the documents held out for evaluation", gt=0, lt=1)
    global_tokens: Literal["none", "first", "headings"] = key(
        "none", "tokens with global attention: none, the first token, or heading tokens (StructFormer)")
    mlm_probability: float = key(0.15, "fraction of tokens masked for masked-LM training", gt=0, lt=1)
    seed: Optional[int] = key(None, "seed of what the data is (document splits, the trained tokenizer, task examples, "
                                    "held-out masks); default: the run's seed. A comparison fixes it, so that its seeds "
                                    "vary training only and every seed is scored on the same examples", ge=0)


@dataclass
class BudgetSpec:
    """``train.budget``: what a run may spend, in one unit. The trainer turns it into ``train.steps``
    before the first step (longctx.train.budget) and records the steps in run_config.json, so a resumed
    run and its LR schedule keep them."""
    flops: Optional[float] = key(None, "training FLOPs: per token 6 x matrix-product weights (embeddings "
                                       "excluded) + 3 x the attention mechanism's forward FLOPs", gt=0)
    seconds: Optional[float] = key(None, "training-step seconds, from the step time measured on this machine "
                                         "(machine-dependent: not reproducible elsewhere)", gt=0)
    tokens: Optional[int] = key(None, "training tokens (steps x batch x grad_accum x seq_len x processes)", ge=1)


@dataclass
class TrainConfig:
    steps: int = key(100, "optimizer steps in all (all phases together when staged); decided by train.budget "
                          "when one is set", ge=1)
    budget: Optional[BudgetSpec] = key(None, "a budget that decides train.steps: {flops: F}, {seconds: S} or "
                                             "{tokens: N}")
    batch_size: int = key(2, "sequences per step per process (before grad_accum)", ge=1)
    grad_accum: int = key(1, "micro-batches accumulated into one optimizer step", ge=1)
    lr: float = key(1e-3, "peak learning rate (AdamW)", gt=0)
    warmup_steps: int = key(10, "steps of linear warm-up", ge=0)
    schedule: Literal["linear", "cosine", "constant"] = key("linear", "learning-rate decay after the warm-up")
    weight_decay: float = key(0.01, "AdamW weight decay", ge=0)
    clip: float = key(1.0, "gradient-norm clipping threshold (0: no clipping)", ge=0)
    bf16: bool = key(False, "bf16 autocast (mixed precision)")
    activation_checkpointing: bool = key(False, "recompute activations in backward to save memory")
    eval_every: int = key(0, "evaluate every N steps (0: at the end only)", ge=0)
    keep_best: bool = key(False, "finetuning: keep the weights of the evaluation (every eval_every steps and at the "
                                 "end) with the best dev score as the final model, and test those")
    eval_batches: int = key(8, "held-out batches per evaluation", ge=1)
    save_every: int = key(50, "write a checkpoint every N steps (0: only the final one)", ge=0)
    keep_last: int = key(2, "checkpoints kept (older ones are deleted)", ge=1)
    log_every: int = key(10, "print and log the training loss every N steps", ge=1)
    extend: bool = key(False, "let a resume continue to a larger train.steps (the learning-rate schedule is then "
                              "recomputed over the new total); without it a changed train.steps is refused")


@dataclass
class Stage:
    """One phase of staged training (``stages: [{steps: 100, seq_len: 512, window: 64}, ...]``)."""
    steps: int = key(help="optimizer steps of this phase", ge=1)
    seq_len: Optional[int] = key(None, "sequence length of this phase (default data.seq_len)", ge=2)
    window: Union[int, list[int], None] = key(None, "one-sided window of this phase, one int or one per layer "
                                                    "(default model.window)")
    lr: Optional[float] = key(None, "peak learning rate of this phase (default train.lr)", gt=0)


@dataclass
class StagePreset:
    """Longformer's staged training (``stages: {preset: double, phases: 3}``): each phase doubles the
    length and the window and halves the learning rate."""
    preset: Literal["double"] = key(help="the preset: double (Longformer's char-LM recipe)")
    phases: int = key(3, "number of phases", ge=1)
    steps: Optional[int] = key(None, "steps per phase (default train.steps // phases)", ge=1)


@dataclass
class Experiment:
    name: str = key("run", "run name (default output folder runs/<name>)")
    seed: int = key(0, "seed of weights, data order, masking and dropout (and of the data itself unless data.seed "
                       "is set)", ge=0)
    objective: Literal["mlm", "clm"] = key("mlm", "masked LM (encoder) or causal LM (decoder)")
    init_from: Optional[str] = key(None, "a saved longctx model folder to continue from (e.g. from "
                                         "`longctx convert`)")
    model: dict = key({"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "attention": "sliding",
                       "window": 64, "position": "learned", "max_position_embeddings": 2048,
                       "hidden_dropout_prob": 0.0}, "the model: LongctxConfig fields (longctx config show lists them)")
    data: DataConfig = key(DataConfig(), "the corpus, tokenizer and sequences")
    train: TrainConfig = key(TrainConfig(), "optimisation, evaluation, checkpoints and logging")
    stages: Union[list[Stage], StagePreset, None] = key(
        None, "staged training: a list of phases {steps, seq_len, window, lr}, or {preset: double, phases: N}")


# the model section: LongctxConfig's own fields; help and limits here, types and defaults from its signature
MODEL_HELP = {
    "vocab_size": ("vocabulary size (set from the tokenizer when training)", {"ge": 1}),
    "hidden_size": ("width of the residual stream", {"ge": 1}),
    "num_hidden_layers": ("number of transformer layers", {"ge": 1}),
    "num_attention_heads": ("attention heads per layer (must divide hidden_size)", {"ge": 1}),
    "intermediate_size": ("width of the feed-forward layer (default 4 x hidden_size)", {"ge": 1}),
    "hidden_act": ("activation of the feed-forward layer (a transformers ACT2FN name)", {}),
    "hidden_dropout_prob": ("dropout on embeddings and residual branches", {"ge": 0, "lt": 1}),
    "norm": ("post (BERT) or pre (GPT-2) layer norm", {}),
    "layer_norm_eps": ("epsilon of the layer norms", {"gt": 0}),
    "initializer_range": ("standard deviation of the initial weights", {"ge": 0}),
    "position": ("position encoding: learned, sinusoidal, rope, alibi, xpos", {}),
    "max_position_embeddings": ("positions of learned/sinusoidal tables (longest sequence)", {"ge": 1}),
    "position_offset": ("rows before position 0 in the learned table (RoBERTa: 2)", {"ge": 0}),
    "rope_base": ("base of the rotary frequencies (rope, xpos)", {"gt": 0}),
    "xpos_scale_base": ("xPos decay scale base B", {"gt": 0}),
    "attention": ("the attention mechanism: a pattern name, {type: NAME, ...keys}, or one per layer", {}),
    "window": ("one-sided sliding window (a token sees w keys on each side), one int or one per layer", {}),
    "window_schedule": ("constant, or grow (Longformer: small windows at the bottom, window at the top)", {}),
    "window_min": ("bottom layer's window when window_schedule is grow (default window // 8)", {"ge": 1}),
    "dilation": ("dilation of the sliding window: one int, one per head, or one list per layer", {}),
    "block": ("block size of blocks / blockwise_causal attention", {"ge": 0}),
    "causal": ("causal attention (set by objective=clm)", {}),
    "global_projections": ("separate query/key/value projections for global tokens (Longformer)", {}),
    "attention_backend": ("kernel: auto, blocked, sdpa, flex, dense", {}),
    "attention_seed": ("seed of random attention layouts (BigBird's random blocks)", {"ge": 0}),
    "pad_token_id": ("padding token id (set from the tokenizer when training)", {"ge": 0}),
    "bos_token_id": ("beginning-of-sequence id (from the tokenizer)", {"ge": 0}),
    "eos_token_id": ("end-of-sequence id (from the tokenizer)", {"ge": 0}),
    "sep_token_id": ("separator id (from the tokenizer; QA's global question tokens end at it)", {"ge": 0}),
    "tie_word_embeddings": ("the LM head's decoder is the word-embedding table", {}),
    "classifier_dropout": ("dropout before a classification head (default hidden_dropout_prob)", {"ge": 0, "lt": 1}),
    "num_labels": ("classes of a sequence-classification head", {"ge": 1}),
}

SECTIONS = {"data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True)
class Key:
    """One declared key: dotted path, type annotation, default, help and pydantic limits."""
    path: str
    annotation: Any
    default: Any
    help: str
    limits: dict
    required: bool = False


def section_keys(cls) -> dict[str, Key]:
    """The declared keys of a dataclass section, by name."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = Key(f.name, hints[f.name], default, f.metadata.get("help", ""), f.metadata.get("limits", {}),
                          required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    return out


@functools.lru_cache(maxsize=1)
def model_keys() -> dict[str, Key]:
    """The ``model`` section's keys: LongctxConfig's signature (types, defaults) plus MODEL_HELP."""
    from longctx.models.config import LongctxConfig

    try:
        hints = typing.get_type_hints(LongctxConfig.__init__)
    except Exception:  # an annotation that cannot be evaluated: check those fields loosely
        hints = {}
    out = {}
    params = inspect.signature(LongctxConfig.__init__).parameters
    for name, p in params.items():
        if name in ("self",) or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        help_, limits = MODEL_HELP.get(name, ("a LongctxConfig field (see longctx.models.config)", {}))
        default = None if p.default is inspect.Parameter.empty else p.default
        out[name] = Key(name, hints.get(name, Any), default, help_, limits)
    if "hidden_act" in out:  # a name transformers knows, not any string (hidden_act=foo failed at build)
        from transformers.activations import ACT2FN
        out["hidden_act"] = dataclasses.replace(out["hidden_act"], annotation=Literal[tuple(ACT2FN)])
    help_, limits = MODEL_HELP["num_labels"]
    out.setdefault("num_labels", Key("num_labels", int, 2, help_, limits))
    return out


def _defaults(cls) -> dict:
    return {k: copy.deepcopy(v.default) for k, v in section_keys(cls).items()}


DEFAULTS: dict = {**_defaults(Experiment), "data": _defaults(DataConfig), "train": _defaults(TrainConfig)}


# ---------------------------------------------------------------------------------------------------
# checking values against the declarations
# ---------------------------------------------------------------------------------------------------
def _members(annotation) -> tuple:
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return (annotation,)


def type_name(annotation) -> str:
    """A reader's name for a declared type: 'int', 'int | list[int]', 'one of mlm, clm', 'mapping'."""
    if annotation is Any:
        return "any"
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if origin is Union or origin is types.UnionType:
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if dataclasses.is_dataclass(annotation):
        return "{" + ", ".join(section_keys(annotation)) + "}"
    if origin is list:
        args = typing.get_args(annotation)
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict or annotation is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


@functools.lru_cache(maxsize=None)
def _adapter(members: tuple, limits: tuple):
    """A strict pydantic validator of the union of ``members``, the limits on its numeric members."""
    from pydantic import ConfigDict, Field, TypeAdapter

    if limits:
        members = tuple(Annotated[m, Field(**dict(limits))] if m in (int, float) else m for m in members)
    ann = members[0] if len(members) == 1 else Union[members]  # type: ignore[valid-type]
    return TypeAdapter(ann, config=ConfigDict(strict=True, arbitrary_types_allowed=True))


def _accepts_float(annotation) -> bool:
    flat = _members(annotation)
    return float in flat and str not in flat


LIMIT_WORDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def check_value(path: str, k: Key, value):
    """``value`` checked against key ``k`` (its type and limits); returns it (YAML's '1e-3' as a
    float), or raises LongctxError naming ``path``."""
    members = _members(k.annotation)
    if value is None and type(None) in members:
        return None
    sections = [m for m in members if dataclasses.is_dataclass(m)]
    if isinstance(value, dict) and sections:
        return check_section(path, sections[0], value)
    lists = [typing.get_args(m)[0] for m in members
             if typing.get_origin(m) is list and typing.get_args(m) and dataclasses.is_dataclass(typing.get_args(m)[0])]
    if isinstance(value, list) and lists:
        return [check_section(f"{path}[{i}]", lists[0], v) for i, v in enumerate(value)]
    if isinstance(value, str) and _accepts_float(k.annotation):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    plain = tuple(m for m in members if not dataclasses.is_dataclass(m) and m not in
                  [list[s] for s in lists])
    if not plain:
        raise LongctxError(f"config key '{path}' expects {type_name(k.annotation)}, got {value!r}")
    from pydantic import ValidationError

    try:
        return _adapter(plain, tuple(sorted(k.limits.items()))).validate_python(value)
    except ValidationError as e:
        errors = e.errors()
        limit = next((er for er in errors if er["type"] in LIMIT_WORDS), None)
        if limit is not None:
            bound = next(iter(limit["ctx"].values()))
            raise LongctxError(f"config key '{path}' must be {LIMIT_WORDS[limit['type']]} {bound}, "
                               f"got {value!r}") from None
        if typing.get_origin(k.annotation) is Literal:
            raise LongctxError(f"config key '{path}' must be {type_name(k.annotation)}, got {value!r}") from None
        raise LongctxError(f"config key '{path}' expects {type_name(k.annotation)}, got {value!r}") from None


def check_section(where: str, cls, values, partial: bool = False) -> dict:
    """A mapping checked against the dataclass section ``cls``: unknown keys, types, limits and (unless
    ``partial``) required keys. Returns the checked values (only the keys given)."""
    if not isinstance(values, dict):
        raise LongctxError(f"config key '{where}' must be a mapping of {type_name(cls)}, got {values!r}")
    keys = section_keys(cls)
    prefix = f"{where}." if where else ""
    out = {}
    for name, value in values.items():
        if name not in keys:
            raise LongctxError(f"unknown config key '{prefix}{name}' (known: {', '.join(keys)})")
        out[name] = check_value(prefix + name, keys[name], value)
    if not partial:
        for name, k in keys.items():
            if k.required and name not in values:
                raise LongctxError(f"config key '{prefix}{name}' is required ({k.help})")
    return out


def check_model(values, partial: bool = True) -> dict:
    if not isinstance(values, dict):
        raise LongctxError(f"config key 'model' must be a mapping of LongctxConfig fields, got {values!r}")
    keys = model_keys()
    out = {}
    for name, value in values.items():
        if name not in keys:
            raise LongctxError(f"unknown config key 'model.{name}' (see LongctxConfig for the model fields; "
                               "`longctx config show` lists them)")
        out[name] = check_value(f"model.{name}", keys[name], value)
    return out


def _check_tree(update: dict) -> dict:
    """Check every key of a (partial) experiment mapping; returns it with values normalised."""
    if not isinstance(update, dict):
        raise LongctxError(f"a config must be a mapping of keys, got {type(update).__name__}")
    top = section_keys(Experiment)
    out = {}
    for name, value in update.items():
        if name not in top:
            raise LongctxError(f"unknown config key '{name}' (known: {', '.join(top)})")
        if name == "model":
            out[name] = check_model(value)
        elif name in SECTIONS:
            out[name] = check_section(name, SECTIONS[name], value, partial=True)
        else:
            out[name] = check_value(name, top[name], value)
    return out


# ---------------------------------------------------------------------------------------------------
# the public functions
# ---------------------------------------------------------------------------------------------------
def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base``, checking ``update``'s keys and types against the
    declarations. Mappings merge key by key at every depth (``stages.steps=5`` keeps the stages' preset,
    ``data.tokenizer.vocab_size=1024`` the tokenizer's algorithm), except that a mapping naming another
    ``type`` (``model.attention={type: sliding, window: 32}`` over a BigBird spec) replaces the old one whole;
    any other value (a list, a string such as ``data.tokenizer=bytes``) is replaced."""
    if not isinstance(update or {}, dict):
        return _check_tree(update)  # the one-sentence error
    return _merged(base, _check_tree(_filled(base, update or {})))


def _filled(base: dict, update: dict) -> dict:
    """``update``'s keys with each value deep-merged over ``base``'s (a partial tokenizer spec or stages
    mapping is checked as the whole it becomes)."""
    out = {}
    for name, value in update.items():
        old = base.get(name)
        if name in ("model", *SECTIONS) and isinstance(value, dict) and isinstance(old, dict):
            out[name] = {k: _merged(old[k], v) if k in old else v for k, v in value.items()}
        else:
            out[name] = _merged(old, value) if old is not None else value
    return out


def _merged(old, new):
    if isinstance(old, dict) and isinstance(new, dict) and new.get("type", old.get("type")) == old.get("type"):
        out = copy.deepcopy(old)
        for key, value in new.items():
            out[key] = _merged(old[key], value) if key in old else copy.deepcopy(value)
        return out
    return copy.deepcopy(new)


def dotted(tree: dict, prefix: str = "", leaves: tuple = ()) -> dict:
    """The inverse of ``parse_overrides``: {'model': {'window': 8}, 'stages': [..]} -> {'model.window': 8,
    'stages': [..]}; an empty mapping, and the keys named in ``leaves``, stay whole."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name not in leaves:
            out.update(dotted(value, name + ".", leaves))
        else:
            out[name] = value
    return out


def parse_overrides(items: list[str]) -> dict:
    """['train.steps=10', 'model.window=32'] -> nested dict, values parsed as YAML."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise LongctxError(f"override {item!r} is not of the form section.key=value")
        name, raw = item.split("=", 1)
        try:
            value = io.yaml_value(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = name.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LongctxError(f"override {item!r} sets a key inside '{part}', which is not a section")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    """A config file's mapping (``longctx.io.load_yaml``: one-sentence errors)."""
    return io.load_yaml(path, "config file")


def resolve(config: dict | None = None, overrides: list[str] | None = None) -> dict:
    """DEFAULTS <- config <- overrides, checked: the plain nested dict the trainer reads."""
    cfg = merge(DEFAULTS, config or {})
    cfg = merge(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """What one key cannot say alone: the window against the sequence, positions against the longest
    phase, the model as a whole (LongctxConfig's own checks), the init_from folder."""
    check_section("", Experiment, {k: v for k, v in cfg.items() if k != "model"} | {"model": {}}, partial=False)
    d = cfg["data"]
    m = cfg["model"]
    window = m.get("window", DEFAULTS["model"]["window"])
    windows = window if isinstance(window, list) else [window]
    if m.get("attention", "sliding") == "sliding" and windows and max(windows) * 2 + 1 > d["seq_len"]:
        raise LongctxError(
            f"the window ({max(windows)} each side) is larger than the sequence (data.seq_len={d['seq_len']}); "
            "use a smaller model.window or full attention")
    if m.get("position", "learned") in ("learned", "sinusoidal") and \
            m.get("max_position_embeddings", 0) < _max_seq_len(cfg):
        raise LongctxError(
            f"model.max_position_embeddings={m.get('max_position_embeddings')} is shorter than the longest "
            f"sequence ({_max_seq_len(cfg)}); raise it or use relative positions")
    _check_model_whole(cfg)
    _check_budget(cfg)
    if cfg.get("init_from"):
        from longctx.models.loading import read_longctx_config
        read_longctx_config(cfg["init_from"], "init_from")


def _check_budget(cfg: dict) -> None:
    """A budget names one unit, and a staged run has no single step cost to divide it by."""
    budget = cfg["train"].get("budget")
    if budget is None:
        return
    units = [u for u in ("flops", "seconds", "tokens") if budget.get(u) is not None]
    if len(units) != 1:
        raise LongctxError(f"train.budget must name exactly one of flops, seconds, tokens, got "
                           f"{', '.join(units) or 'none'}")
    if cfg.get("stages"):
        raise LongctxError("train.budget cannot be combined with stages (each phase costs differently per step); "
                           "give the phases their steps instead")


def _check_model_whole(cfg: dict) -> None:
    """Build the LongctxConfig once now, so that an inconsistent model section (heads not dividing
    the width, a per-layer list of the wrong length) stops before any data is read."""
    from longctx.models.config import from_run_config

    try:
        from_run_config(cfg, vocab_size=cfg["model"].get("vocab_size", 8))
    except LongctxError as e:
        raise LongctxError(f"model section: {e}") from None
    except Exception as e:  # a type-valid but meaningless value the model's own checks did not word
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LongctxError(f"model section is not a valid LongctxConfig ({first})") from None


def _max_seq_len(cfg: dict) -> int:
    return max([cfg["data"]["seq_len"]] + [s["seq_len"] for s in stage_list(cfg)])


# ---------------------------------------------------------------------------------------------------
# documentation generated from the declarations (`longctx config show`)
# ---------------------------------------------------------------------------------------------------
def all_keys() -> list[Key]:
    """Every key, dotted, in the order `longctx config show` prints them."""
    out = []
    for name, k in section_keys(Experiment).items():
        if name == "model":
            for mname, mk in model_keys().items():
                default = DEFAULTS["model"].get(mname, mk.default)
                out.append(dataclasses.replace(mk, path=f"model.{mname}", default=default))
        elif name in SECTIONS:
            for sname, sk in section_keys(SECTIONS[name]).items():
                out.append(dataclasses.replace(sk, path=f"{name}.{sname}"))
                if sname == "tokenizer":
                    out += [dataclasses.replace(t, path=f"data.tokenizer.{tn}")
                            for tn, t in section_keys(TokenizerSpec).items()]
                if sname == "budget":
                    out += [dataclasses.replace(b, path=f"train.budget.{bn}")
                            for bn, b in section_keys(BudgetSpec).items()]
        else:
            out.append(k)
            if name == "stages":
                out += [dataclasses.replace(s, path=f"stages[].{sn}") for sn, s in section_keys(Stage).items()]
                out += [dataclasses.replace(s, path=f"stages.{sn}") for sn, s in section_keys(StagePreset).items()
                        if sn != "preset"] + [dataclasses.replace(section_keys(StagePreset)["preset"],
                                                                  path="stages.preset")]
    return out


def describe_limits(k: Key) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{words[n]} {v}" for n, v in k.limits.items())

