"""What every finetuning task shares: task options, splits, tokenizer, model, padding and the
evaluation loop. A task file adds its data (``load_splits``), its features (``featurize``), its
collator fields and its metrics (``score``).

Task options live in the experiment config's ``task:`` section (``task.train_file=...`` on the command
line); each task declares them with defaults in ``OPTIONS``, and the experiment defaults that suit it
(sequence length, model size, steps) in ``CONFIG``. Options every task has:

- ``train_file`` / ``dev_file`` / ``test_file``: the user's data (JSONL, JSON, CSV, Parquet); none given:
  the task's built-in data, made from what ships on the machine;
- ``dataset`` / ``schema``: the user's data as one path and the published schema of its rows
  (``longctx.tasks.schemas``: TriviaQA, HotpotQA, Qasper, NarrativeQA, QuALITY, SCROLLS);
- ``global_tokens``: the task's global-attention preset (``question`` for QA, ``first`` for
  classification) or ``none`` (no global token: a sliding window then sees only its window);
- ``eval_examples``: evaluate on the first N examples of a split (0: all);
- ``bootstrap``: resamples of the 95% intervals.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import torch

from longctx.data.corpus import _unit_hash
from longctx.data.tokenizer import load_tokenizer
from longctx.errors import LongctxError
from longctx.paths import cache_root
from longctx.tasks.base import Task

COMMON_OPTIONS = {"train_file": None, "dev_file": None, "test_file": None, "dataset": None, "schema": None,
                  "global_tokens": None,
                  "eval_examples": 0, "bootstrap": 1000}
SPLITS = ("train", "dev", "test")

# one line of help per task option (``longctx config show --config COMPARISON`` prints them with each task's
# defaults); an option a task declares without an entry here is listed with its default only
OPTION_HELP = {
    "train_file": "the training split: a JSONL, JSON, CSV or Parquet file (none: the task's built-in data)",
    "dev_file": "the dev split (learning rates and best checkpoints are chosen on it)",
    "test_file": "the test split (scored once, on the final or chosen model)",
    "dataset": "the user's data as one path: a datasets save_to_disk folder, a folder of Parquet / JSON / CSV files "
               "or one file (splits from their names; docs/tasks.md)",
    "schema": "the published schema of task.dataset's rows: squad, triviaqa, hotpotqa, qasper, narrativeqa, quality, "
              "scrolls_* (none: the task's own fields)",
    "global_tokens": "the task's global-attention preset (question for QA, first for classification) or none",
    "eval_examples": "evaluate on the first N examples of a split (0: all)",
    "bootstrap": "resamples of the 95% bootstrap intervals",
    "max_answer_length": "longest answer span predicted, in tokens",
    "doc_stride": "tokens of overlap between consecutive chunks of a context longer than one sequence",
    "max_question_tokens": "question tokens kept (the rest are cut)",
    "max_chunks": "most chunks of one context (a longer context is refused)",
    "context_chars": "characters of each built-in context",
    "far_fraction": "the evidence lies beyond this fraction of the context (built-in data)",
    "questions_per_context": "questions drawn from each context (built-in QA)",
    "answer_offset": "0: the answer is the question word's occurrence; 1: the word right after it (built-in QA)",
    "min_answer_words": "shortest answer sentence, in words (built-in data)",
    "max_answer_chars": "longest answer sentence, in characters (built-in data)",
    "text_field": "the field holding the text in the user's files",
    "text_pair_field": "the field holding the second text of a pair in the user's files",
    "label_field": "the field holding the label in the user's files",
    "pairs_per_doc": "pairs drawn from each document (built-in data)",
    "train_size": "generated training examples",
    "dev_size": "generated dev examples",
    "test_size": "generated test examples",
    "max_depth": "deepest nesting of operators (ListOps)",
    "max_args": "most arguments of an operator (ListOps)",
    "min_length": "shortest sequence, in symbols (exclusive; ListOps)",
    "max_length": "longest sequence, in symbols (exclusive; ListOps)",
    "corpus": "the structured corpus the examples come from (none: the pretraining run's, else texdoc)",
    "per_section": "questions drawn from each section",
    "min_gap": "characters between a heading and a question sentence taken from its section",
    "heading_global": "heading tokens global at finetuning too: auto (as the model was pretrained), true or false",
    "length": "context length, an integer or a list to sweep, in length_unit (none: 2,000 chars or 512 tokens)",
    "length_unit": "unit of length: chars or tokens",
    "depth": "the needle's depth, a fraction of the haystack before it, or a list to sweep (none: uniform)",
    "depth_bins": "bins of the accuracy-by-depth breakdown",
    "haystack": "the text around the needles: corpus or noise",
    "form": "extractive (an encoder's span; none: extractive) or generation (a causal LM generates the answer)",
    "max_new_tokens": "generation form: most tokens generated per answer (none: the task's default)",
}


def option_keys(cls) -> list[tuple[str, str, object, str]]:
    """(option, type, default, help) of every ``task.*`` option of task class ``cls``: the common ones,
    then its own, typed as ``task_options`` checks them (``OPTION_TYPES``, else the default's type)."""
    defaults = {**COMMON_OPTIONS, **cls.OPTIONS}
    types_ = getattr(cls, "OPTION_TYPES", {})
    out = []
    for name, d in defaults.items():
        if name in types_:
            kind = " | ".join(t.__name__ for t in types_[name])
        elif name == "global_tokens":
            kind, d = f"one of none, {cls.default_global}", cls.default_global
        elif d is None:
            kind = "any"
        else:
            kind = type(d).__name__
        out.append((name, kind, d, OPTION_HELP.get(name, "")))
    return out


def task_options(cls, given: dict | None) -> dict:
    """The task's options: its defaults overridden by ``given``, unknown keys and wrong types refused."""
    defaults = {**COMMON_OPTIONS, **cls.OPTIONS}
    out = copy.deepcopy(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            raise LongctxError(f"unknown config key 'task.{key}' for task {cls.name!r}; its keys are "
                               f"{', '.join(sorted(defaults))}")
        d = defaults[key]
        types = getattr(cls, "OPTION_TYPES", {}).get(key)  # an option of several types (e.g. "auto" or a bool)
        if types is not None and value is not None:
            if not isinstance(value, types):
                raise LongctxError(f"config key 'task.{key}' expects {' or '.join(t.__name__ for t in types)}, "
                                   f"got {value!r}")
        elif d is not None and value is not None:
            if isinstance(d, bool):
                ok = isinstance(value, bool)
            elif isinstance(d, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(d, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                value = float(value) if ok else value
            else:
                ok = isinstance(value, type(d))
            if not ok:
                raise LongctxError(f"config key 'task.{key}' expects {type(d).__name__}, got {value!r}")
        out[key] = value
    default = cls.default_global_for(out)
    preset = out["global_tokens"] or default
    if preset not in ("none", default):
        raise LongctxError(f"config key 'task.global_tokens' must be none" + (f" or {default}" if default != "none" else "")
                           + f" for task {cls.name!r}{' with these task options' if default != cls.default_global else ''}"
                           f", got {preset!r}")
    out["global_tokens"] = preset
    return out


def pad_batch(examples, pad_id: int, global_tokens: str) -> dict:
    """input_ids / attention_mask / global_attention_mask (B, n) padded to the longest example; the
    first ``n_global`` tokens of an example are global unless the preset is ``none``."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), n), dtype=torch.long)
    glob = torch.zeros((len(examples), n), dtype=torch.bool)
    for row, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[row, :k] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        att[row, :k] = 1
        if global_tokens != "none":
            glob[row, :e["n_global"]] = True
    return {"input_ids": ids, "attention_mask": att, "global_attention_mask": glob}


class FinetuneTask(Task):
    OPTIONS: ClassVar[dict] = {}
    CONFIG: ClassVar[dict] = {}
    default_global: ClassVar[str] = "none"
    from_scratch: ClassVar[bool] = False  # LRA-style: `compare` trains it from scratch for every variant
    higher_is_better = True

    @classmethod
    def default_global_for(cls, opts: dict) -> str:
        """The global-tokens preset of the task with options ``opts`` (``default_global`` unless an option
        changes the model, as a RULER task's generation form does)."""
        return cls.default_global

    @classmethod
    def objective_for(cls, opts: dict) -> str | None:
        """The pretraining objective the task's model must have with options ``opts``, where the task fixes
        one (a RULER task's generation form: clm); None: any."""
        return None

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.opts = task_options(type(self), cfg.get("task"))
        self.global_tokens = self.opts["global_tokens"]
        self._features: dict = {}

    # ---- data ----
    def prepare(self) -> None:
        self.splits = self.load_splits()
        for split in SPLITS:
            if not self.splits.get(split):
                where = self.opts.get(f"{split}_file") or self.opts.get("dataset") or "the built-in data"
                raise LongctxError(f"the {split} split of task {self.name!r} is empty ({where}); give it examples")
        self.tokenizer = self.make_tokenizer()

    def load_splits(self) -> dict[str, list[dict]]:
        raise NotImplementedError

    def tokenizer_texts(self) -> list[str]:
        """Training texts a tokenizer to train (``data.tokenizer: {train: bpe}``) learns from."""
        raise NotImplementedError

    def make_tokenizer(self):
        """The saved model's own tokenizer with ``init_from``; else ``data.tokenizer`` (trained on the
        training texts when it is a training spec, cached)."""

        init = self.cfg.get("init_from")
        if init and (Path(init) / "tokenizer.json").exists():
            return load_tokenizer(str(init))
        spec = self.cfg["data"]["tokenizer"]
        docs = None
        if isinstance(spec, dict):
            docs = [{"id": str(i), "text": t} for i, t in enumerate(self.tokenizer_texts())]
        return load_tokenizer(spec, documents=docs, cache_dir=cache_root() / "tokenizers")

    def featurize(self, records: list[dict], seq_len: int, train: bool) -> list[dict]:
        raise NotImplementedError

    def train_examples(self, seq_len: int):
        key = ("train", seq_len)
        if key not in self._features:
            self._features[key] = self.featurize(self.splits["train"], seq_len, train=True)
            if not self._features[key]:
                raise LongctxError(f"no training example of task {self.name!r} fits data.seq_len={seq_len}; "
                                   "use a longer sequence")
        return self._features[key]

    def eval_records(self, split: str) -> list[dict]:
        if split not in self.splits:
            raise LongctxError(f"task {self.name!r} has no split {split!r}; use dev or test")
        n = self.opts["eval_examples"]
        return self.splits[split][:n] if n else self.splits[split]

    def eval_examples(self, split: str, seq_len: int):
        key = (split, seq_len)
        if key not in self._features:
            self._features[key] = self.featurize(self.eval_records(split), seq_len, train=False)
        return self._features[key]

    # ---- model ----
    def build_model(self, init_from: str | None = None):
        model = super().build_model(init_from)
        if model.config.sep_token_id is None:  # a saved model without one (a pretraining's)
            model.config.sep_token_id = self.tokenizer.sep_id
        return model

    # ---- batches and evaluation ----
    def inputs(self, examples) -> dict:
        """The model inputs of a batch of features (padded, with the task's global tokens), no labels."""
        return pad_batch(examples, self.tokenizer.pad_id, self.global_tokens)

    def collate(self, examples, batch_index: int = 0, rank: int = 0) -> dict:
        batch = self.inputs(examples)
        batch.update(self.label_tensors(examples))
        return batch

    def label_tensors(self, examples) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def forward_all(self, model, feats, batch_size: int, device=None) -> list:
        """The model's outputs for every feature, in order (eval mode, labels left out)."""
        was_training = model.training
        model.eval()
        outs = []
        for i in range(0, len(feats), batch_size):
            batch = self.inputs(feats[i:i + batch_size])
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            outs.extend(self.unbatch(model(**batch), batch))
        model.train(was_training)
        return outs

    def unbatch(self, output, batch) -> list:
        raise NotImplementedError

    def evaluate(self, model, split: str = "dev", *, seq_len: int | None = None, batch_size: int | None = None,
                 device=None, **_) -> dict:
        seq_len = seq_len or self.cfg["data"]["seq_len"]
        feats = self.eval_examples(split, seq_len)
        outs = self.forward_all(model, feats, batch_size or self.cfg["train"]["batch_size"], device)
        return {"split": split, **self.score(split, feats, outs)}

    def score(self, split: str, feats, outs) -> dict:
        raise NotImplementedError


class PicksALabel:
    """For tasks whose examples carry one class index ``label`` and whose model's logits pick it
    (classification, ListOps, multiple choice): the labels tensor and the argmax predictions."""

    def label_tensors(self, examples) -> dict:
        return {"labels": torch.tensor([e["label"] for e in examples])}

    def unbatch(self, output, batch) -> list:
        return output.logits.argmax(-1).cpu().tolist()


def split_by_document(items: list, key, seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, list]:
    """train / dev / test by document: an item goes where ``sha256(seed, key(item))`` falls, so every
    example of a document lands in the same split and adding documents never moves others."""

    out = {s: [] for s in SPLITS}
    for item in items:
        h = _unit_hash(seed, str(key(item)))
        split = "train" if h < fractions[0] else "dev" if h < fractions[0] + fractions[1] else "test"
        out[split].append(item)
    return out
