"""Tasks: what a model is trained and judged on. One file per task plus one ``@register`` line.

A task owns everything task-specific, so one trainer (``longctx.train``) runs pretraining and
finetuning alike:
- ``model_class``: the Hugging Face head it trains (masked LM, causal LM, QA, classification);
- ``global_tokens``: its global-attention preset ("none", "first", "question", "headings"), which its
  collator writes into ``global_attention_mask``;
- ``prepare()``: load or build its data (train / dev / test, split by document) and tokenizer;
- ``train_examples(seq_len)`` / ``eval_examples(split, seq_len)``: sequences of examples (dicts);
- ``collate(examples, batch_index, rank)``: the model's inputs as tensors, labels included. Anything
  random in a batch is a function of (seed, batch_index, rank) only, for exact resume;
- ``evaluate(model, split, ...)``: its metrics as a dict, the primary one under ``primary_metric``,
  each quality figure with a 95% interval (``<metric>_ci``: [low, high], bootstrap over examples).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from longctx.errors import LongctxError
from longctx.models.config import from_run_config
from longctx.models.loading import load_longctx_model


class Task:
    name: ClassVar[str] = ""
    primary_metric: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False
    global_tokens: ClassVar[str] = "none"
    model_class: ClassVar[Any] = None
    causal: ClassVar[bool] = False  # the model attends causally (a causal LM)

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.tokenizer = None

    def prepare(self) -> None:
        raise NotImplementedError

    def head_config(self) -> dict:
        """The ``model_class`` head's own config fields (``num_labels``, ...), fresh or loaded."""
        return {}

    def build_model(self, init_from: str | None = None):
        """A fresh model from the config's ``model`` section (vocabulary and special ids from the
        tokenizer), or the model saved at ``init_from``."""
        tok = self.tokenizer
        if init_from:
            path = Path(init_from)  # refused unless a longctx model; never runs code from the folder
            model = load_longctx_model(path, self.model_class, "init_from", **self.head_config())
            if model.config.vocab_size < tok.vocab_size:
                raise LongctxError(f"init_from model has {model.config.vocab_size} tokens but the tokenizer "
                                   f"{tok.vocab_size}; use the model's own tokenizer (data.tokenizer={path})")
            return model
        return self.model_class(from_run_config(
            self.cfg, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, sep_token_id=tok.sep_id,
            bos_token_id=getattr(tok, "bos_id", None), eos_token_id=getattr(tok, "eos_id", None),
            causal=self.causal, **self.head_config()))

    def train_examples(self, seq_len: int):
        raise NotImplementedError

    def eval_examples(self, split: str, seq_len: int):
        raise NotImplementedError

    def collate(self, examples, batch_index: int, rank: int = 0) -> dict:
        raise NotImplementedError

    def evaluate(self, model, split: str = "dev", **kwargs) -> dict:
        raise NotImplementedError


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task selectable by its ``name`` (``longctx finetune --task NAME``)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise LongctxError(f"task {name!r} is unknown; use one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def data_seed(cfg: dict) -> int:
    """The seed of what the data is (splits, tokenizer, task examples, held-out masks): ``data.seed``,
    or the run's ``seed`` when it is not set."""
    s = (cfg.get("data") or {}).get("seed")
    return cfg["seed"] if s is None else s


def stage_list(cfg: dict) -> list[dict]:
    """The phases of staged training, each {steps, seq_len, window, lr}; [] when not staged. Here, below
    the trainer that runs them (``longctx.train``), because a task checks its data against every phase's
    length (``mlm.LanguageModelTask.prepare``)."""
    stages = cfg.get("stages")
    if not stages:
        return []
    if isinstance(stages, dict):
        n = int(stages.get("phases", 3))
        steps = int(stages.get("steps") or max(1, cfg["train"]["steps"] // n))
        w0 = cfg["model"].get("window", 64)
        w0 = w0[0] if isinstance(w0, list) else w0
        return [{"steps": steps, "seq_len": cfg["data"]["seq_len"] * 2 ** i, "window": w0 * 2 ** i,
                 "lr": cfg["train"]["lr"] / 2 ** i} for i in range(n)]
    return [{"steps": int(s["steps"]), "seq_len": int(s.get("seq_len") or cfg["data"]["seq_len"]),
             "window": s["window"] if s.get("window") is not None else cfg["model"].get("window"),
             "lr": float(s.get("lr") or cfg["train"]["lr"])} for s in stages]
