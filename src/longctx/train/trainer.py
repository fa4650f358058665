"""The one trainer: pretraining and finetuning alike, any ``Task`` (longctx.tasks), on Accelerate.

One process on a laptop CPU, or many through ``accelerate launch`` / ``torchrun`` (DDP; FSDP through
Accelerate's config); bf16 autocast with ``train.bf16``. Written as torchtune's recipes are: ``setup()``
(run folder, data, model, optimizer, resume), ``step()`` (one optimizer step), ``evaluate()``, ``save()``
(an atomic checkpoint) and ``finish()`` (final checkpoint, evaluation, model and results); ``fit()``
runs them in order.

Reproducible by construction: batch k depends only on (seed, k, rank) (the task's collator), so a
checkpoint stores just the step; a resumed run ends bit-identical to one that was never stopped (one
process, CPU, same seed), wherever it was killed, checkpoint writes included. Ctrl-C or SIGTERM stops a
run at the next step boundary with a checkpoint (KeyboardInterrupt: the command exits 130), every process
of a distributed run at the same one (``StopRequests``).

The run folder (``out_dir``) holds ``checkpoints/``, ``metrics.jsonl``, ``tb/``, ``run_config.json`` (the
config of the latest start), and at the end ``model/``, ``loss.png`` and ``results.json`` (written
last: a run is finished when it exists).

What the trainer asks of a task (``longctx.tasks.base``): ``prepare()``; ``build_model(init_from)``;
``train_examples(seq_len)`` (indexable); ``collate(examples, batch_index, rank)`` returning the model's
inputs with ``input_ids`` and ``labels`` (the model returns ``.loss``); ``evaluate(model, split, *,
seq_len, batches, batch_size, device, allow_empty)`` returning a dict of metrics (``allow_empty``: no
examples gives ``None`` metrics instead of an error); ``tokenizer`` (saved with the model when it has
``save``). A task may list ``final_splits`` (default ``("dev",)``): each is evaluated at the end,
the first under ``eval``, the others under ``eval_<split>``.
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from longctx.errors import LongctxError
from longctx.io import publish_dir, read_jsonl, write_json, write_text
from longctx.memory import peak_rss_bytes
from longctx.progress import Progress, phase, plain_interval
from longctx.tasks.base import stage_list
from longctx.train.checkpoint import (CorruptCheckpoint, checkpoint_dirs, clean_temporaries, config_changes,
                                      fault_point, load_checkpoint, lock_run, plain, read_json, save_checkpoint,
                                      verify_checkpoint)
from longctx.train.optim import make_optimizer
import longctx.tasks.clm  # noqa: F401  (registers the task)
import longctx.tasks.mlm  # noqa: F401  (registers the task)
from longctx import cpu_cache
from longctx.attention import dispatch
from longctx.data.collate import batch_order
from longctx.plots import ema, line_figure
from longctx.tasks import get_task
from longctx.train.budget import describe, plan, adopt_saved_steps


def lr_schedule(cfg: dict, stages: list[dict]):
    """LR multiplier per step: linear warm-up, then the phase's LR (relative to train.lr) decayed as
    configured over the whole run."""
    t = cfg["train"]
    ends = stage_ends(stages)
    total = ends[-1]
    bounds = [(end, s["lr"] / t["lr"]) for end, s in zip(ends, stages)]

    def factor(step: int) -> float:
        phase = next(f for end, f in bounds if step < end) if step < total else bounds[-1][1]
        warm = min(1.0, (step + 1) / max(1, t["warmup_steps"]))
        progress = min(1.0, max(0.0, (step - t["warmup_steps"]) / max(1, total - t["warmup_steps"])))
        decay = {"linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                 "constant": 1.0}[t["schedule"]]
        return phase * warm * max(decay, 0.0)

    return factor


def stage_ends(stages: list[dict]) -> list[int]:
    """The step at which each stage ends (cumulative steps): stage i runs steps [ends[i-1], ends[i])."""
    ends, acc = [], 0
    for s in stages:
        acc += s["steps"]
        ends.append(acc)
    return ends


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and PyTorch's global generators (a task or a library may draw from any)."""

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return peak_rss_bytes()


class StopRequests:
    """Ctrl-C while training: the first asks the run to stop once the current step is done, the second
    stops it at once (KeyboardInterrupt). A checkpoint is only consistent between steps: one taken
    mid-step would hold the random state the step had consumed (its dropout masks) and, past
    ``optimizer.step()``, weights of a step it does not count, so the resumed run would differ from one
    never stopped. Takes over each signal that would raise KeyboardInterrupt: SIGINT, and SIGUSR1 in a
    comparison's child, whose parent sends it on Ctrl-C (longctx.experiments.variant); and SIGTERM where
    it would kill the process (what torchrun's agent passes on, and what SLURM and other schedulers send
    some seconds before SIGKILL), taken as the first Ctrl-C. A SIGTERM after a SIGTERM asks nothing more
    (a scheduler signals every process of a job and torchrun passes its own on, so a worker may get two);
    after a Ctrl-C it is a second one (torchrun answers a second Ctrl-C by sending its workers SIGTERM).

    In a distributed run (torch.distributed initialized, more than one process) each process hears its
    own signals, at its own moment; ``stop_now()`` at every step boundary agrees on one answer (one
    all-reduce, MAX, of a one-element flag), so that all stop after the same step and rank 0's checkpoint
    is of the step every process has done. Every process calls it at every boundary: a collective."""

    def __init__(self, device=None):
        self.device = device  # where the flag's all-reduce runs: the process group's device (CPU for gloo)
        self.requested = False  # this process was asked: the signal (an int, never 0), or False
        self.stopping = False  # the run stops at this boundary (any process was asked)
        self.distributed = (torch.distributed.is_available() and torch.distributed.is_initialized()
                            and torch.distributed.get_world_size() > 1)
        self.rank = torch.distributed.get_rank() if self.distributed else 0

    def __enter__(self) -> "StopRequests":
        self.requested = self.stopping = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers
            for sig in (signal.SIGINT, signal.SIGUSR1):
                if signal.getsignal(sig) is signal.default_int_handler:
                    self._old[sig] = signal.signal(sig, self._request)
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._request)
        return self

    def _request(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGTERM == self.requested:
                return
            raise KeyboardInterrupt
        self.requested = signum  # truthy: the first request's signal
        if self.stopping:  # already stopping (another process asked): nothing to add
            return
        who = f"rank {self.rank}: " if self.distributed else ""
        what = "SIGTERM" if signum == signal.SIGTERM else "interrupted"
        again = "" if signum == signal.SIGTERM else " (Ctrl-C again stops it at once, without one)"
        print(f"{who}{what}: the run stops after this step and saves a checkpoint{again}", file=sys.stderr, flush=True)

    def stop_now(self) -> bool:
        """At a step boundary: whether the run stops here. One process: whether it was asked; several:
        whether any was, the same answer on all."""
        if not self.distributed:
            self.stopping = bool(self.requested)
            return self.stopping
        flag = torch.tensor([int(bool(self.requested))], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.stopping = bool(flag.item())
        return self.stopping

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _forget_other_precision(mixed: str) -> None:
    """Accelerate keeps one process-wide state and refuses an ``Accelerator`` of another mixed precision
    ("restart your runtime"): a second run in the same process with another ``train.bf16`` (an fp32
    pretraining, then a bf16 one, as tests/test_docs_commands.py runs the printed commands) forgets the old
    precision. Only the precision part is reset; the process group (``PartialState``) stays."""
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and held != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)


def _rewind_metrics(path: Path, step: int) -> None:
    """Keep the rows up to ``step`` (the resumed checkpoint): the rows a killed run logged after it are
    logged again by the resumed run, and a torn last line would glue itself to the next row."""
    if path.exists():
        rows = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class Trainer:
    def __init__(self, cfg: dict, task, out_dir: str | Path, resume: bool = False, progress: bool = True):
        self.cfg, self.task, self.out = cfg, task, Path(out_dir)
        self.resume, self.progress = resume, progress
        self.t = cfg["train"]
        self.stages = stage_list(cfg) or [{"steps": self.t["steps"], "seq_len": cfg["data"]["seq_len"],
                                           "window": cfg["model"].get("window"), "lr": self.t["lr"]}]
        self.stage_ends = stage_ends(self.stages)  # computed once: the schedule and the phases share it
        self.total_steps = self.stage_ends[-1]
        self.state = {"step": 0, "tokens": 0, "train_time": 0.0, "world_size": 1}
        self.finished_result = None
        self.extended_from = None  # train.steps of the checkpoints, when train.extend lengthens the run
        self._lock = None
        self.writer = None
        self.last_loss = float("nan")

    # ---- setup ----
    def say(self, text: str, warning: bool = False) -> None:
        """A line on stderr from the main process; warnings (damaged checkpoints, config changes) even
        with progress off."""
        if self.main and (self.progress or warning):
            print(text, file=sys.stderr, flush=True)

    def setup(self) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs  # here: slow to import, only when training

        hf_logging.disable_progress_bar()
        if self.t["eval_batches"] < 1:
            raise LongctxError(f"train.eval_batches={self.t['eval_batches']} evaluates nothing; use 1 or more")
        mixed = "bf16" if self.t["bf16"] else "no"
        _forget_other_precision(mixed)
        # global projections get no gradient in batches without global tokens: DDP must allow that
        self.accelerator = acc = Accelerator(
            mixed_precision=mixed, cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.rank, self.world, self.main = acc.process_index, acc.num_processes, acc.is_main_process
        self.state["world_size"] = self.world
        if self.main:
            self._lock = lock_run(self.out)  # before anything is read or cleaned: another run may own it
            clean_temporaries(self.out)
        acc.wait_for_everyone()

        self.candidates = self._resume_candidates()
        if self.candidates and self._finished(self.candidates[0][0]):
            return
        say = self.main and self.progress  # setup phases that take a while say so (progress.phase)
        with phase("preparing the data", enabled=say):
            self.task.prepare()
        # seeded right before the weights are drawn: whatever prepare() did (built its data, or read it from
        # the cache) cannot shift the initialisation
        seed_everything(self.cfg["seed"])
        with phase("building the model", enabled=say):
            model = self.task.build_model(self.cfg.get("init_from"))
        if self.t["activation_checkpointing"]:
            model.gradient_checkpointing_enable()
        self.n_params = sum(p.numel() for p in model.parameters())
        self._plan_compute(model)  # FLOPs per step; a train.budget decides the steps here, before the schedule
        optimizer = make_optimizer(model, self.cfg)
        schedule = lr_schedule(self.cfg, self.stages)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        if self.candidates:
            self._load(model, optimizer, scheduler)
            if self.extended_from is not None:
                self._extend_schedule(optimizer, scheduler, schedule)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.unwrapped = acc.unwrap_model(self.model)
        self.step_no = self.state["step"]
        self.phase, self.train_data = None, None
        # a line at every log step, and (output not a terminal) one at least every plain_interval() seconds
        # between them, so that a log file shows a run at long lengths moving
        self.show = Progress(self.total_steps, "train", "step", enabled=self.main and self.progress,
                             interval=plain_interval(), initial=self.step_no)
        self._window_tokens = 0
        if self.main:
            from torch.utils.tensorboard import SummaryWriter  # here: slow to import, only when logging to TensorBoard
            write_json(self.out / "run_config.json", plain(self.cfg))
            _rewind_metrics(self.out / "metrics.jsonl", self.step_no)
            # events after the resumed step are the killed run's: TensorBoard drops them
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step_no + 1 if self.step_no else None)

    def _plan_compute(self, model) -> None:
        """``self.compute`` (results.json): FLOPs and tokens per step and the run's FLOPs; with
        ``train.budget`` on a fresh start, the steps it buys become train.steps (run_config.json keeps
        them, so a resume does not decide again)."""

        self.compute = plan(model, self.task, self.cfg, self.accelerator, decide=not self.candidates)
        if "steps" in self.compute:
            self._set_total_steps(self.compute.pop("steps"))
            self.say(describe(dict(self.compute, steps=self.total_steps)))
        per_step = self.compute["flops_per_step"]
        if per_step is None:
            self.compute["train_flops"] = None
        elif len(self.stages) == 1:
            self.compute["train_flops"] = per_step * self.total_steps
        else:  # staged: each phase's FLOPs per step times its steps (budget.phase_flops)
            from longctx.train.budget import staged_flops
            self.compute["train_flops"] = staged_flops(self.compute["phase_flops_per_step"], self.stages)

    def _set_total_steps(self, steps: int) -> None:
        self.t["steps"] = steps
        self.stages[-1]["steps"] = steps  # one phase: a budget is refused with stages
        self.stage_ends = stage_ends(self.stages)
        self.total_steps = self.stage_ends[-1]

    def _resume_candidates(self) -> list[tuple[Path, dict]]:
        """The intact checkpoints, newest first, each with the config it was trained with; reports the
        damaged ones and the config changes; refuses changes the checkpoints cannot take."""
        existing = checkpoint_dirs(self.out)
        if existing and not self.resume:
            raise LongctxError(f"{self.out} already holds checkpoints; pass --resume to continue, or choose "
                               "another --out")
        if not existing:
            return []
        intact, damaged = [], []
        for path in reversed(existing):
            why = verify_checkpoint(path)
            if why:
                damaged.append(f"{path.name} ({why})")
            else:
                intact.append(path)
        if not intact:
            raise LongctxError(f"no checkpoint in {self.out / 'checkpoints'} is intact: {'; '.join(damaged)}; "
                               "the run cannot continue, start it again with another --out")
        if damaged:
            self.say(f"skipping damaged checkpoint(s) {'; '.join(damaged)}: resuming from {intact[0].name}, the "
                     "newest intact one", warning=True)
        saved = read_json(intact[0] / "run_config.json") or read_json(self.out / "run_config.json")
        if saved is not None:
            if adopt_saved_steps(self.cfg, saved):  # the steps the first start's budget decided
                self._set_total_steps(self.cfg["train"]["steps"])
            unsafe, safe = config_changes(saved, self.cfg)
            old_steps = saved["train"]["steps"]
            if unsafe:
                longer = any(c.startswith("train.steps ") for c in unsafe) and self.total_steps > old_steps
                raise LongctxError(
                    f"cannot resume {self.out}: the config differs from the one its checkpoints were trained with "
                    f"in {', '.join(unsafe)}, which change the model, the data or the optimisation (train.steps: "
                    f"the learning-rate schedule); resume with the saved values (in "
                    f"{intact[0] / 'run_config.json'}) or start a new run with another --out"
                    + ("; to lengthen this run instead, add train.extend=true" if longer else ""))
            if any(c.startswith("train.steps ") for c in safe):
                self.extended_from = old_steps  # said, with the new schedule, once the checkpoint is loaded
            if [c for c in safe if not c.startswith(("train.steps ", "train.extend "))]:
                self.say(f"resuming with changed {', '.join(safe)}: allowed, they change neither the model nor "
                         "the data", warning=True)
        return [(p, saved) for p in intact]

    def _extend_schedule(self, optimizer, scheduler, schedule) -> None:
        """train.extend: the schedule is recomputed over the new total; the optimizer, which holds the old
        schedule's rate for the next step, gets the new one's, and the change is said."""
        step, lr = self.state["step"], self.t["lr"]
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * schedule(step)
        old = lr_schedule(self.cfg, [{"steps": self.extended_from, "lr": lr}])
        self.say(f"extending the run from {self.extended_from} to {self.total_steps} steps (train.extend): its "
                 f"{self.t['schedule']} learning-rate schedule is recomputed over {self.total_steps} steps, so step "
                 f"{step + 1} runs at {lr * schedule(step):.2e} (the old schedule's {lr * old(step):.2e}) and the "
                 f"last at {lr * schedule(self.total_steps - 1):.2e}", warning=True)

    def _finished(self, newest: Path) -> bool:
        """A run whose newest checkpoint is its last step and whose results.json exists is done."""
        state = read_json(newest / "state.json") or {}
        result = read_json(self.out / "results.json")
        if state.get("step") == self.total_steps and result is not None and result.get("steps") == self.total_steps \
                and (self.out / "model").is_dir():
            self.say(f"{self.out} finished earlier ({self.total_steps} of {self.total_steps} steps); its model is in "
                     f"{self.out / 'model'}", warning=True)
            self.finished_result = result
            return True
        return False

    def _load(self, model, optimizer, scheduler) -> None:
        for i, (path, _) in enumerate(self.candidates):
            try:
                state = load_checkpoint(path, model, optimizer, scheduler)
            except CorruptCheckpoint as e:
                if i + 1 == len(self.candidates):
                    raise LongctxError(f"{e}; no older intact checkpoint is left, start the run again with "
                                       "another --out") from None
                self.say(f"{e}; falling back to {self.candidates[i + 1][0].name}", warning=True)
                continue
            if state.get("world_size", 1) != self.world:
                raise LongctxError(f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                                   f"{self.world}; resume with the same number")
            if state["step"] > self.total_steps:
                raise LongctxError(f"checkpoint {path} is at step {state['step']}, past train.steps="
                                   f"{self.total_steps}; resume with train.steps >= {state['step']}")
            self.state = state
            self.resumed_from = path
            self.say(f"resuming from {path} (step {state['step']})")
            return

    # ---- training ----
    def _enter_phase(self) -> None:
        from longctx.train.loop import set_windows  # here: a cycle (loop imports this module)

        phase = next(i for i, end in enumerate(self.stage_ends) if self.step_no < end)
        if phase != self.phase:
            self.phase = phase
            s = self.stages[phase]
            self.train_data = self.task.train_examples(s["seq_len"])
            if len(self.stages) > 1 and s.get("window") is not None:
                set_windows(self.unwrapped, s["window"])

    def step(self) -> float:
        """One optimizer step (``grad_accum`` micro-batches); returns the loss (mean over processes)."""

        t, acc = self.t, self.accelerator
        self._enter_phase()
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for a in range(t["grad_accum"]):
            k = self.step_no * t["grad_accum"] + a  # the micro-batch index: the data position
            idx = batch_order(len(self.train_data), t["batch_size"], k, self.cfg["seed"], self.rank, self.world)
            batch = self.task.collate([self.train_data[i] for i in idx], batch_index=k, rank=self.rank)
            batch = {key: v.to(acc.device) for key, v in batch.items()}
            tokens += batch["input_ids"].numel() * self.world
            loss = self.model(**batch).loss / t["grad_accum"]
            acc.backward(loss)
            loss_sum += float(loss.detach())
        fault_point("step.backward")  # mid-step (the stop tests ask for a stop here, at a known step)
        self.last_loss = float(acc.reduce(torch.tensor(loss_sum, device=acc.device), "mean"))
        if not math.isfinite(self.last_loss):
            good = checkpoint_dirs(self.out)
            where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
            raise LongctxError(f"the loss became {self.last_loss} at step {self.step_no + 1}; training stopped and "
                               f"{where}. Lower train.lr, raise train.warmup_steps, or turn off train.bf16")
        if t["clip"] > 0:
            acc.clip_grad_norm_(self.model.parameters(), t["clip"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_no += 1
        self.state.update(step=self.step_no, tokens=self.state["tokens"] + tokens,
                          train_time=self.state["train_time"] + time.perf_counter() - t0)
        self._window_tokens += tokens
        return self.last_loss

    def log(self, record: dict) -> None:
        if not self.main:
            return
        record = {k: v for k, v in record.items() if k != "per_example"}  # per-example scores: results.json only
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step",):
                self.writer.add_scalar(f"{record['type']}/{key}", value, record["step"])

    def evaluate(self, split: str = "dev", allow_empty: bool = True) -> dict:
        seq_len = self.stages[self.phase if self.phase is not None else -1]["seq_len"]
        return self.task.evaluate(self.model, split, seq_len=seq_len, batches=self.t["eval_batches"],
                                  batch_size=self.t["batch_size"], device=self.accelerator.device,
                                  allow_empty=allow_empty)

    def save(self) -> None:
        """An atomic checkpoint of the current step (written by the main process)."""
        self.accelerator.wait_for_everyone()
        if self.main:
            save_checkpoint(self.out, self.unwrapped, self.optimizer, self.scheduler, dict(self.state),
                            self.t["keep_last"], run_config=plain(self.cfg))
        self.accelerator.wait_for_everyone()

    def fit(self) -> dict:
        try:
            self.setup()
            if self.finished_result is not None:
                return self.finished_result
            return self._train()
        finally:
            if getattr(self, "show", None) is not None:
                self.show.close()
            if self.writer is not None:
                self.writer.close()
            if self._lock is not None:
                self._lock.close()

    def _train(self) -> dict:
        t = self.t
        self.model.train()
        if self.accelerator.device.type == "cpu":
            # the fused CPU kernel loads (builds, the first time) on first use: here, before the clock, so a
            # variant's tokens/s never includes it (it cost the sliding window half its speed in a comparison)
            # and the caching allocator goes on, so that steps at long lengths do not fault every large
            # activation in afresh (longctx.cpu_cache; LONGCTX_CPU_CACHE_MB=0 turns it off)
            with phase("loading the fused CPU kernel (built once, then cached)", enabled=self.main and self.progress):
                dispatch.prepare_fused()
                cpu_cache.setup()
            self.show.restart_clock()  # the steps' rate and ETA, not the kernel's build
        self._window_tokens, window_start = 0, time.perf_counter()
        with StopRequests(self.accelerator.device) as stop:
            try:
                first = True
                while self.step_no < self.total_steps:
                    with phase("the first training step", enabled=first and self.main and self.progress):
                        self.step()
                    first = False
                    step = self.step_no
                    if not (step % t["log_every"] == 0 or step == self.total_steps):
                        self.show.update(1)
                    else:
                        elapsed = time.perf_counter() - window_start
                        tok_s = self._window_tokens / max(elapsed, 1e-9)
                        lr = self.scheduler.get_last_lr()[0]
                        self.show.update(1, log=True, loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}",
                                         tok_s=f"{tok_s:,.0f}")
                        self.log({"type": "train", "step": step, "loss": self.last_loss, "lr": lr,
                                  "tokens_per_s": tok_s, "tokens": self.state["tokens"],
                                  "train_time": self.state["train_time"]})
                        self._window_tokens, window_start = 0, time.perf_counter()
                    if t["eval_every"] and step % t["eval_every"] == 0 and step < self.total_steps:
                        ev = self.evaluate()
                        self.log({"type": "eval", "step": step, **ev, "train_time": self.state["train_time"]})
                        if t["keep_best"]:
                            self._keep_if_best(ev)
                    if t["save_every"] and step % t["save_every"] == 0 and step < self.total_steps:
                        self.save()
                    if stop.stop_now():  # every process, every step: in a distributed run, a collective
                        break
            except KeyboardInterrupt:  # the second Ctrl-C, mid-step: a state no checkpoint may hold
                self.say(f"interrupted again: stopped during step {self.step_no + 1} without saving it", warning=True)
                raise
            if stop.stopping:  # with the handlers still in place: a second SIGTERM cannot kill its checkpoint
                self._stop_here()
        return self.finish()

    def _stop_here(self) -> None:
        """A stop at this step boundary (every process, in a distributed run): the checkpoint of this step,
        then KeyboardInterrupt (the command's exit 130, resumable)."""
        if not self.main:  # each process says where it stopped (before the checkpoint's barriers)
            print(f"rank {self.rank}: stopping after step {self.step_no} with every other process", file=sys.stderr,
                  flush=True)
        if self.step_no > 0:
            if not self._saved_at_this_step():
                self.save()
            # how to continue is the command's to say (longctx.cli): --resume, or compare's plain rerun
            every = f"every process stopped after step {self.step_no}; " if self.world > 1 else ""
            self.say(f"interrupted: {every}checkpoint of step {self.step_no} saved in {self.out / 'checkpoints'}",
                     warning=True)
        raise KeyboardInterrupt

    def _saved_at_this_step(self) -> bool:
        done = checkpoint_dirs(self.out)
        return bool(done) and done[-1].name == f"step-{self.step_no:06d}"

    def finish(self) -> dict:
        """The last checkpoint (unless the run resumed from it), the final evaluation, the model and
        results.json; each output is written whole or not at all, results.json last."""
        if not self._saved_at_this_step():
            self.save()
        if self.phase is None:  # resumed from the last checkpoint: no step ran
            self._enter_phase_for_eval()
        splits = tuple(getattr(self.task, "final_splits", None) or ("dev",))
        ev = self.evaluate(splits[0])
        self.log({"type": "eval", "step": self.step_no, **ev, "train_time": self.state["train_time"]})
        best_step = self.step_no
        if self.t["keep_best"]:
            best_step, ev = self._best_of(ev)
        result = {
            "name": self.cfg["name"], "task": self.task.name, "primary_metric": self.task.primary_metric,
            "objective": self.cfg.get("objective"),
            "steps": self.step_no, "tokens": self.state["tokens"], "parameters": self.n_params,
            "train_time_s": self.state["train_time"],
            "tokens_per_s": self.state["tokens"] / max(self.state["train_time"], 1e-9),
            "peak_memory_bytes": peak_memory_bytes(), "final_train_loss": self.last_loss, "eval": ev,
            **({"best_step": best_step} if self.t["keep_best"] else {}),
            "attention": self.unwrapped.config.describe_attention(), "seq_len": self.stages[-1]["seq_len"],
            "world_size": self.world, **self.compute,
        }
        for split in splits[1:]:
            result[f"eval_{split}"] = self.evaluate(split)
        if self.main:
            fault_point("finish.start")
            with publish_dir(self.out / "model", prefix=".tmp-model-") as tmp:
                self.unwrapped.save_pretrained(tmp)
                if self.task.tokenizer is not None and hasattr(self.task.tokenizer, "save"):
                    save_tokenizer(self.task.tokenizer, tmp, self.unwrapped.config)
                fault_point("finish.model")
            plot_losses(read_jsonl(self.out / "metrics.jsonl"), self.out / "loss.png")
            fault_point("finish.plot")
            write_json(self.out / "results.json", result)
        self.accelerator.wait_for_everyone()
        return result

    def _better(self, ev: dict, than: dict | None) -> bool:
        m = self.task.primary_metric
        if than is None:
            return True
        higher = getattr(self.task, "higher_is_better", True)
        return ev[m] > than[m] if higher else ev[m] < than[m]

    def _keep_if_best(self, ev: dict) -> None:
        """``train.keep_best``: the weights of the best dev evaluation so far in ``best/`` (with best.json:
        its step and evaluation), written whole or not at all, so a resumed run keeps it."""
        best = read_json(self.out / "best" / "best.json")
        if not self.main or not self._better(ev, best and best["eval"]):
            return
        with publish_dir(self.out / "best", prefix=".tmp-best-") as tmp:
            self.unwrapped.save_pretrained(tmp)
            write_json(tmp / "best.json", {"step": self.step_no, "eval": ev})

    def _best_of(self, final: dict) -> tuple[int, dict]:
        """(step, dev evaluation) of the best of the kept weights and the final ones; the model holds the
        best weights afterwards (the final ones win a tie: fewer steps are not preferred for less)."""
        best = read_json(self.out / "best" / "best.json")
        if best is None or not self._better(best["eval"], final):
            return self.step_no, final
        kept = type(self.unwrapped).from_pretrained(self.out / "best", trust_remote_code=False)
        self.unwrapped.load_state_dict(kept.state_dict())
        self.say(f"best dev {self.task.primary_metric} at step {best['step']} ({best['eval'][self.task.primary_metric]:.4f}, "
                 f"final {final[self.task.primary_metric]:.4f}): its weights are the model")
        return best["step"], best["eval"]

    def _enter_phase_for_eval(self) -> None:
        """The last phase's data and windows, for a run resumed at its last step."""
        from longctx.train.loop import set_windows  # here: a cycle (loop imports this module)

        self.phase = len(self.stages) - 1
        s = self.stages[-1]
        if len(self.stages) > 1 and s.get("window") is not None:
            set_windows(self.unwrapped, s["window"])
        self.last_loss = self._last_logged_loss()

    def _last_logged_loss(self) -> float:
        rows = [r for r in read_jsonl(self.out / "metrics.jsonl") if r.get("type") == "train"]
        return rows[-1]["loss"] if rows else float("nan")


def plot_losses(rows: list[dict], png: Path) -> Path:
    """loss.png of one run: the training loss per logged step (faint), its EMA, and the held-out loss at
    each evaluation."""

    tr = [r for r in rows if r.get("type") == "train" and r.get("loss") is not None]
    ev = [r for r in rows if r.get("type") == "eval" and r.get("loss") is not None]
    steps, losses = [r["step"] for r in tr], [r["loss"] for r in tr]
    series = [{"x": steps, "y": losses, "label": "train", "color": "C0", "alpha": 0.3},
              {"x": steps, "y": ema(losses), "label": "train (EMA)", "color": "C0"}]
    if ev:
        series.append({"x": [r["step"] for r in ev], "y": [r["loss"] for r in ev], "style": "o-",
                       "label": "held-out", "color": "C1"})
    return line_figure(png, series, "step", "loss", figsize=(6, 4))


def save_tokenizer(tokenizer, folder: Path, model_config) -> None:
    """The tokenizer saved beside its model with ``model_max_length`` the model's positions
    (``max_position_embeddings``: the learned or sinusoidal table's length, and the length relative-position
    models are declared for), not "no limit"; a task's own tokenizer class without ``max_length`` as it saves."""

    if "max_length" in inspect.signature(tokenizer.save).parameters:
        tokenizer.save(folder, max_length=int(model_config.max_position_embeddings))
    else:
        tokenizer.save(folder)


def train(cfg: dict, task, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train ``task`` (a ``Task`` instance) as ``cfg`` says; write checkpoints, logs, the final model and
    results.json into ``out_dir``; returns the results."""
    return Trainer(cfg, task, out_dir, resume=resume, progress=progress).fit()


def task_for(cfg: dict, task_name: str | None = None):
    """The task instance: ``task_name`` from the registry, or the config's LM objective (mlm / clm)."""

    name = task_name or cfg.get("objective") or "mlm"
    try:
        importlib.import_module(f"longctx.tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"longctx.tasks.{name}":
            raise
        # registered by another module, or unknown: get_task says which exist
    return get_task(name)(cfg)
