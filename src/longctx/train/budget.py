"""Training compute: the FLOPs of a training step, counted from the model, and budgets (``train.budget:
{flops: F}``, ``{seconds: S}`` or ``{tokens: N}``) turned into a number of steps before the first one.

The count (Kaplan et al.'s 6N rule with the attention core added, as in Chinchilla's appendix):
    training FLOPs = 6 x (matrix-product weights x the positions they run on)
                   + 3 x (each layer mechanism's forward FLOPs, ``Mechanism.flops(n, num_global)``)
A weight does 2 FLOPs per position forward and 4 backward (gradients of input and weight); the
attention core's backward does twice its forward. Embeddings are lookups (no FLOPs); biases, norms,
activations and the loss are left out (small beside the products; ``torch.utils.flop_counter`` leaves
them out as well, which makes it the oracle of the tests). The positions a weight runs on are the
model's own: the encoder's weights every position, Longformer's global projections every position of a
batch with global tokens, the masked-LM head only the masked positions (it skips the others), the
classification head one position per sequence. The mechanism counts its useful work (4 x head size per
attended pair for a mask, global rows and columns included), not what a kernel happens to compute.

A step's FLOPs depend on its batch (masked positions, global tokens), so ``plan`` takes the mean of the
first ``SAMPLE_STEPS`` steps' batches: batch k is a function of (seed, k, rank), so the figure is the same
on every process and in every run. A FLOPs or token budget therefore gives the same steps everywhere; a
seconds budget measures this machine's step time (on a copy of the model, so training itself is
untouched) and is not reproducible on another machine, nor exactly on the same one.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import statistics
import time

import numpy as np
import torch
from torch import nn

from longctx.attention.mechanism import Mechanism
from longctx.data.collate import batch_order
from longctx.errors import LongctxError
from longctx.models.modeling import (LongctxForMaskedLM, LongctxForMultipleChoice, LongctxForQuestionAnswering,
                                     LongctxForSequenceClassification, question_global_mask)
from longctx.train.optim import make_optimizer

SAMPLE_STEPS = 8        # steps whose batches give the FLOPs and tokens of an average step
TIMING_STEPS = (1, 4)   # a seconds budget: 1 untimed step (first-call costs), then the median of 4
# the most steps a budget may buy: past any real run (BERT pretrained for 1M); more is a typo or .inf
MAX_STEPS = 10**9


def matmul_weights(model: nn.Module) -> dict[str, int]:
    """Weights of the model's matrix products (``nn.Linear``), in three groups by the positions they run
    on: ``body`` (every position), ``global`` (Longformer's global projections: every position of a batch
    with global tokens), ``head`` (the task head). Products inside a mechanism (Linformer's E and F) are
    the mechanism's own FLOPs, not counted here."""

    inside = {id(m) for mech in model.modules() if isinstance(mech, Mechanism) for m in mech.modules()}
    base = getattr(model, "longctx", model)
    body = {id(m) for m in base.modules()}
    out = {"body": 0, "global": 0, "head": 0}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or id(m) in inside:
            continue
        group = "head" if id(m) not in body else "global" if name.rsplit(".", 1)[-1].endswith("_global") else "body"
        out[group] += m.in_features * m.out_features
    return out


def _flat(batch: dict) -> dict:
    """A multiple-choice batch's (B, options, n) tensors as the (B * options, n) sequences the model runs."""
    if batch["input_ids"].dim() != 3:
        return batch
    return {k: v.reshape(-1, v.shape[-1]) if k in ("input_ids", "attention_mask", "global_attention_mask")
            and v is not None else v for k, v in batch.items()}


def _global_mask(model, batch: dict) -> torch.Tensor | None:
    """(B, n) bool: the batch's global tokens, or the ones the model's head puts there by default."""

    batch = _flat(batch)
    ids = batch["input_ids"]
    gm = batch.get("global_attention_mask")
    if gm is None and isinstance(model, LongctxForQuestionAnswering):
        gm = question_global_mask(ids, model.config.sep_token_id)
    elif gm is None and isinstance(model, (LongctxForSequenceClassification, LongctxForMultipleChoice)):
        gm = torch.zeros_like(ids, dtype=torch.bool)
        gm[:, 0] = True
    return None if gm is None or not bool(gm.bool().any()) else gm.bool()


def head_positions(model, batch: dict) -> int:
    """Positions the task head runs on: the masked positions of a masked LM (``LongctxForMaskedLM`` skips
    the rest), the first token of each sequence for classification, every position otherwise."""

    batch = _flat(batch)
    B, n = batch["input_ids"].shape
    if isinstance(model, LongctxForMaskedLM) and batch.get("labels") is not None:
        return int((batch["labels"] != -100).sum())
    if isinstance(model, (LongctxForSequenceClassification, LongctxForMultipleChoice)):
        return B
    return B * n


def step_flops(model, batch: dict) -> float:
    """Training FLOPs (forward + backward) of one micro-batch: 6 per matrix-product weight per position
    it runs on, plus 3 x every layer mechanism's forward FLOPs for every sequence, with its global tokens."""

    batch = _flat(batch)
    B, n = batch["input_ids"].shape
    w = matmul_weights(model)
    gm = _global_mask(model, batch)
    per_seq = [0] * B if gm is None else [int(g) for g in gm.sum(-1).tolist()]
    mechs = [m for m in model.modules() if isinstance(m, Mechanism)]
    core = {g: sum(m.flops(n, g) if g else m.flops(n) for m in mechs) for g in set(per_seq)}
    products = w["body"] * B * n + (w["global"] * B * n if gm is not None else 0) + w["head"] * head_positions(model, batch)
    return 6.0 * products + 3.0 * sum(core[g] for g in per_seq)


def sample_steps(model, task, cfg: dict, world: int, steps: int = SAMPLE_STEPS) -> dict:
    """FLOPs and tokens of an average optimizer step: the mean over the first ``steps`` steps, each its
    ``grad_accum`` micro-batches on every process (the trainer's batches, built without training)."""

    t = cfg["train"]
    data = task.train_examples(cfg["data"]["seq_len"])
    flops = tokens = 0.0
    for step in range(steps):
        for a in range(t["grad_accum"]):
            k = step * t["grad_accum"] + a
            for rank in range(world):
                idx = batch_order(len(data), t["batch_size"], k, cfg["seed"], rank, world)
                batch = task.collate([data[i] for i in idx], batch_index=k, rank=rank)
                flops += step_flops(model, batch)
                tokens += batch["input_ids"].numel()
    return {"flops_per_step": flops / steps, "tokens_per_step": tokens / steps}


def phase_flops(model, task, cfg: dict, stages: list[dict], world: int) -> list[float]:
    """Staged training: the FLOPs of an average optimizer step of each phase (``sample_steps`` at the
    phase's length, on a copy of the model given the phase's windows), so a staged run's FLOPs are
    ``sum(phase_flops[i] * stages[i]["steps"])``. The model itself is untouched."""
    from longctx.train.loop import set_windows

    out = []
    for s in stages:
        work = copy.deepcopy(model)
        if s.get("window") is not None:
            set_windows(work, s["window"])
        c = dict(cfg, data=dict(cfg["data"], seq_len=s["seq_len"]))
        out.append(sample_steps(work, task, c, world)["flops_per_step"])
        del work
    return out


def staged_flops(per_phase: list[float], stages: list[dict]) -> float:
    """A staged run's training FLOPs: each phase's FLOPs per step times its steps."""
    return float(sum(f * s["steps"] for f, s in zip(per_phase, stages)))


def measure_step_seconds(model, task, cfg: dict, device, rank: int = 0, world: int = 1) -> float:
    """Median seconds of a training step on this machine, timed on a copy of the model with its own
    optimizer (forward, backward, optimizer step; ``TIMING_STEPS``), the global RNG states restored, so
    the run that follows is the one ``train.steps`` alone would give."""

    t = cfg["train"]
    data = task.train_examples(cfg["data"]["seq_len"])
    cuda = torch.device(device).type == "cuda"
    times = []
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
        work = copy.deepcopy(model).to(device).train()
        opt = make_optimizer(work, cfg)
        for step in range(sum(TIMING_STEPS)):
            t0 = time.perf_counter()
            for a in range(t["grad_accum"]):
                k = step * t["grad_accum"] + a
                idx = batch_order(len(data), t["batch_size"], k, cfg["seed"], rank, world)
                batch = {key: v.to(device) for key, v in task.collate([data[i] for i in idx], batch_index=k,
                                                                      rank=rank).items()}
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=t["bf16"]):
                    loss = work(**batch).loss / t["grad_accum"]
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        del work, opt
    return statistics.median(times[TIMING_STEPS[0]:])


def steps_for(budget: dict, per_step: dict) -> int:
    """Whole steps that fit in ``budget`` ({flops|seconds|tokens: value}); a budget below one step, or
    one that buys more than ``MAX_STEPS`` (infinity included), is an error."""
    unit, value = next((u, v) for u, v in budget.items() if v is not None)
    cost = per_step[{"flops": "flops_per_step", "seconds": "seconds_per_step", "tokens": "tokens_per_step"}[unit]]
    if cost is None:
        raise LongctxError(f"train.budget.{unit} cannot be used: the step's {unit} could not be counted")
    if not value / cost <= MAX_STEPS:  # `not <=` also catches nan
        raise LongctxError(f"train.budget.{unit}={value:g} buys more than {MAX_STEPS:,} training steps of "
                           f"{cost:.4g} {unit}; give a finite budget that fits a run")
    steps = math.floor(value / cost * (1 + 1e-12))  # a budget of exactly k steps is k, not k - 1 by rounding
    if steps < 1:
        raise LongctxError(f"train.budget.{unit}={value:g} is less than one training step ({cost:.4g} {unit}); "
                           "raise the budget or lower train.batch_size or data.seq_len")
    return steps


@contextlib.contextmanager
def _rng_kept(device=None):
    """Python's, NumPy's and PyTorch's global random states as they were before the block: planning
    draws nothing the training that follows would see."""

    py, npy = random.getstate(), np.random.get_state()
    cuda = device is not None and torch.device(device).type == "cuda"
    try:
        with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def plan(model, task, cfg: dict, accelerator=None, decide: bool = True) -> dict:
    device = accelerator.device if accelerator is not None else None
    with _rng_kept(device):
        return _plan(model, task, cfg, accelerator, decide)


def _plan(model, task, cfg: dict, accelerator=None, decide: bool = True) -> dict:
    """The run's compute record: FLOPs and tokens per step (sampled) and ``train.budget``; with ``decide``
    (a fresh start; a resume keeps its saved steps) the seconds per step (measured, for a seconds budget)
    and the steps the budget buys (``steps``)."""
    world = accelerator.num_processes if accelerator is not None else 1
    try:
        rec = sample_steps(model, task, cfg, world)
    except NotImplementedError:  # a mechanism without a FLOP count: no FLOPs, no FLOPs budget
        rec = {"flops_per_step": None, "tokens_per_step": None}
    rec["flops_per_token"] = (rec["flops_per_step"] / rec["tokens_per_step"]
                              if rec["flops_per_step"] is not None else None)
    from longctx.tasks.base import stage_list
    stages = stage_list(cfg)
    if len(stages) > 1 and rec["flops_per_step"] is not None:  # each phase costs differently per step
        rec["phase_flops_per_step"] = phase_flops(model, task, cfg, stages, world)
    budget = cfg["train"].get("budget")
    if not budget:
        return rec
    rec["budget"] = dict(budget)
    if not decide:
        return rec
    if budget.get("seconds") is not None:
        device = accelerator.device if accelerator is not None else torch.device("cpu")
        s = measure_step_seconds(model, task, cfg, device, accelerator.process_index if accelerator else 0, world)
        if accelerator is not None and world > 1:  # every process must take the same number of steps
            s = float(accelerator.gather(torch.tensor([s], device=device)).max())
        rec["seconds_per_step"] = s
    rec["steps"] = steps_for(budget, rec)
    return rec


def describe(rec: dict) -> str:
    """'budget flops=3e+12: 37 steps of 8.1e+10 FLOPs' for the progress line."""
    unit, value = next((u, v) for u, v in rec["budget"].items() if v is not None)
    cost = {"flops": f"{rec['flops_per_step']:.3g} FLOPs", "tokens": f"{rec['tokens_per_step']:,.0f} tokens",
            "seconds": f"{rec.get('seconds_per_step', 0):.3g} s (measured)"}[unit]
    return f"budget {unit}={value:g}: {rec['steps']} steps of {cost}"


def adopt_saved_steps(cfg: dict, saved: dict | None) -> bool:
    """On resume: a run with the same budget as its checkpoints keeps the steps they decided (a seconds
    budget is not measured again, so the schedule and the end are the first start's). True if adopted."""
    budget = cfg["train"].get("budget")
    if not budget or not saved or (saved.get("train") or {}).get("budget") != budget:
        return False
    cfg["train"]["steps"] = int(saved["train"]["steps"])
    return True
