"""The pretraining loop (masked or causal LM), on Accelerate: one process on a laptop CPU, or many through
``accelerate launch`` / ``torchrun`` (DDP; FSDP through Accelerate's config).

Reproducible by construction: batch k (its blocks and its masked positions) depends only on
(seed, k, rank), so a checkpoint stores just the step; ``resume=True`` continues from the last one and
ends bit-identical to a run that was never stopped (one process, CPU, same seed).
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from longctx.data.collate import CLMCollator, MLMCollator, batch_order
from longctx.data.packing import PackedDataset, prepare_data
from longctx.errors import LongctxError
from longctx.train.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from longctx.train.config import stage_list

EVAL_BATCH_OFFSET = 10**9  # masking seeds of evaluation batches, far from any training batch index


def build_model(cfg: dict, tokenizer):
    """A fresh model from the config's ``model`` section (vocabulary and special ids from the tokenizer),
    or the model saved at ``init_from``."""
    from longctx.models import LongctxConfig, LongctxForCausalLM, LongctxForMaskedLM

    causal = cfg["objective"] == "clm"
    cls = LongctxForCausalLM if causal else LongctxForMaskedLM
    if cfg.get("init_from"):
        path = Path(cfg["init_from"])
        if not (path / "config.json").exists():
            raise LongctxError(f"init_from {path} is not a saved model folder (no config.json)")
        model = cls.from_pretrained(path)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise LongctxError(f"init_from model has {model.config.vocab_size} tokens but the tokenizer "
                               f"{tokenizer.vocab_size}; use the model's own tokenizer (data.tokenizer={path})")
        return model
    fields = dict(cfg["model"])
    fields.update(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, sep_token_id=tokenizer.sep_id,
                  bos_token_id=getattr(tokenizer, "bos_id", None), eos_token_id=getattr(tokenizer, "eos_id", None),
                  causal=causal)
    return cls(LongctxConfig(**fields))


def set_windows(model, window) -> None:
    """Staged training: give every sliding-window layer a new one-sided window (int or one per layer)."""
    layers = model.longctx.layers
    windows = window if isinstance(window, list) else [window] * len(layers)
    for layer, w in zip(layers, windows):
        if layer.attention.pattern.kind == "sliding":
            layer.attention.pattern = replace(layer.attention.pattern, window=int(w))
    model.config.window = window
    model.config.layers = None


def _schedule(cfg: dict, stages: list[dict]):
    """LR multiplier per step: linear warm-up, then the phase's LR (relative to train.lr) decayed as
    configured over the whole run."""
    t = cfg["train"]
    total = sum(s["steps"] for s in stages)
    bounds = []
    acc = 0
    for s in stages:
        acc += s["steps"]
        bounds.append((acc, s["lr"] / t["lr"]))

    def factor(step: int) -> float:
        phase = next(f for end, f in bounds if step < end) if step < total else bounds[-1][1]
        warm = min(1.0, (step + 1) / max(1, t["warmup_steps"]))
        progress = min(1.0, max(0.0, (step - t["warmup_steps"]) / max(1, total - t["warmup_steps"])))
        decay = {"linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                 "constant": 1.0}[t["schedule"]]
        return phase * warm * max(decay, 0.0)

    return factor


def _optimizer(model, cfg):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    t = cfg["train"]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}], lr=t["lr"], betas=(0.9, 0.98), eps=1e-6)


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def evaluate(model, dataset, collator, batches: int, batch_size: int, accelerator=None) -> dict:
    """Mean held-out loss over the first ``batches`` batches (fixed masks), and its perplexity."""
    model.eval()
    total, count = 0.0, 0
    n = min(batches, max(1, len(dataset) // batch_size))
    with torch.no_grad():
        for i in range(n):
            idx = batch_order(len(dataset), batch_size, i, 0, shuffle=False)
            batch = collator([dataset[j] for j in idx], batch_index=EVAL_BATCH_OFFSET + i)
            if accelerator is not None:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            labels = batch["labels"]
            k = int((labels[:, 1:] != -100).sum()) if isinstance(collator, CLMCollator) else int((labels != -100).sum())
            loss = model(**batch).loss
            total += float(loss) * k
            count += k
    model.train()
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


class Progress:
    """One line per log step: loss, learning rate, tokens/s and ETA."""

    def __init__(self, total_steps: int, enabled: bool, stream=sys.stderr):
        self.total, self.enabled, self.stream = total_steps, enabled, stream

    def __call__(self, step: int, loss: float, lr: float, tok_s: float, remaining_s: float, extra: str = ""):
        if self.enabled:
            eta = f"{int(remaining_s // 60)}m{int(remaining_s % 60):02d}s"
            print(f"step {step:>6}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | ETA {eta}{extra}",
                  file=self.stream, flush=True)


def pretrain(cfg: dict, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train as configured; write checkpoints, logs, the final model and results.json into ``out_dir``."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    t, d = cfg["train"], cfg["data"]
    # global projections get no gradient in batches without global tokens: DDP must allow that
    accelerator = Accelerator(mixed_precision="bf16" if t["bf16"] else "no", cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    torch.manual_seed(cfg["seed"])

    existing = checkpoint_dirs(out)
    if existing and not resume:
        raise LongctxError(f"{out} already holds checkpoints; pass --resume to continue, or choose another --out")
    data = prepare_data(d["corpus"], d["tokenizer"], d["valid_fraction"], cfg["seed"], d["text_field"])
    tok = data.tokenizer
    stages = stage_list(cfg) or [{"steps": t["steps"], "seq_len": d["seq_len"], "window": cfg["model"].get("window"),
                                  "lr": t["lr"]}]
    total_steps = sum(s["steps"] for s in stages)
    for s in stages:
        if len(data.train) < s["seq_len"] or len(data.valid) < s["seq_len"]:
            raise LongctxError(
                f"the corpus is too small for data.seq_len={s['seq_len']}: {len(data.train):,} training and "
                f"{len(data.valid):,} held-out tokens; use a bigger corpus or a shorter sequence")

    model = build_model(cfg, tok)
    if t["activation_checkpointing"]:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    causal = cfg["objective"] == "clm"
    collator = CLMCollator(tok) if causal else MLMCollator(tok, d["mlm_probability"], d["global_tokens"], cfg["seed"])
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, stages))

    state = {"step": 0, "tokens": 0, "train_time": 0.0, "world_size": world}
    if resume and existing:
        state = load_checkpoint(existing[-1], model, optimizer, scheduler)
        if state.get("world_size", 1) != world:
            raise LongctxError(f"checkpoint {existing[-1]} was written by {state['world_size']} processes, "
                               f"this run has {world}; resume with the same number")
        if main and progress:
            print(f"resuming from {existing[-1]} (step {state['step']})", file=sys.stderr)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)

    out.mkdir(parents=True, exist_ok=True)
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))
    metrics_path = out / "metrics.jsonl"
    show = Progress(total_steps, main and progress)

    def log(record: dict):
        if not main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step",):
                writer.add_scalar(f"{record['type']}/{key}", value, record["step"])

    def checkpoint():
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(out, unwrapped, optimizer, scheduler, dict(state), t["keep_last"])
        accelerator.wait_for_everyone()

    step = state["step"]
    phase_bounds = []
    acc = 0
    for s in stages:
        acc += s["steps"]
        phase_bounds.append(acc)
    current_phase, dataset, valid = None, None, None
    window_start = time.perf_counter()
    window_tokens = 0
    last_loss = float("nan")
    model.train()
    try:
        while step < total_steps:
            phase = next(i for i, end in enumerate(phase_bounds) if step < end)
            if phase != current_phase:
                current_phase = phase
                s = stages[phase]
                start_token = tok.cls_id if d["global_tokens"] == "first" else None
                dataset = PackedDataset(data.train, s["seq_len"], start_token=start_token)
                valid = PackedDataset(data.valid, s["seq_len"], start_token=start_token)
                if len(stages) > 1 and s.get("window") is not None:
                    set_windows(unwrapped, s["window"])
            t0 = time.perf_counter()
            loss_sum = 0.0
            for a in range(t["grad_accum"]):
                k = step * t["grad_accum"] + a
                idx = batch_order(len(dataset), t["batch_size"], k, cfg["seed"], rank, world)
                batch = collator([dataset[i] for i in idx], batch_index=k, rank=rank)
                batch = {key: v.to(accelerator.device) for key, v in batch.items()}
                loss = model(**batch).loss / t["grad_accum"]
                accelerator.backward(loss)
                loss_sum += float(loss.detach())
            loss_t = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean")
            last_loss = float(loss_t)
            if not math.isfinite(last_loss):
                good = checkpoint_dirs(out)
                where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
                raise LongctxError(f"the loss became {last_loss} at step {step + 1}; training stopped and {where}. "
                                   "Lower train.lr, raise train.warmup_steps, or turn off train.bf16")
            if t["clip"] > 0:
                accelerator.clip_grad_norm_(model.parameters(), t["clip"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = t["batch_size"] * t["grad_accum"] * world * stages[phase]["seq_len"]
            dt = time.perf_counter() - t0
            state.update(step=step, tokens=state["tokens"] + step_tokens, train_time=state["train_time"] + dt)
            window_tokens += step_tokens
            if step % t["log_every"] == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                tok_s = window_tokens / max(elapsed, 1e-9)
                rate = state["train_time"] / step
                show(step, last_loss, scheduler.get_last_lr()[0], tok_s, rate * (total_steps - step))
                log({"type": "train", "step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                     "tokens_per_s": tok_s, "tokens": state["tokens"], "train_time": state["train_time"]})
                window_start, window_tokens = time.perf_counter(), 0
            if t["eval_every"] and step % t["eval_every"] == 0 and step < total_steps:
                ev = evaluate(model, valid, collator, t["eval_batches"], t["batch_size"], accelerator)
                log({"type": "eval", "step": step, **ev, "train_time": state["train_time"]})
            if t["save_every"] and step % t["save_every"] == 0 and step < total_steps:
                checkpoint()
    except KeyboardInterrupt:
        if step > 0 and main:
            checkpoint()
            print(f"interrupted: checkpoint of step {step} saved in {out / 'checkpoints'}; "
                  "continue with --resume", file=sys.stderr)
        raise

    checkpoint()
    ev = evaluate(model, valid, collator, t["eval_batches"], t["batch_size"], accelerator)
    if causal:  # bits per character of the held-out text
        tokens_per_char = len(data.valid) / max(1, data.valid_chars)
        ev["bits_per_char"] = ev["loss"] * tokens_per_char / math.log(2)
    log({"type": "eval", "step": step, **ev, "train_time": state["train_time"]})
    result = {
        "name": cfg["name"], "objective": cfg["objective"], "steps": step, "tokens": state["tokens"],
        "parameters": n_params, "train_time_s": state["train_time"],
        "tokens_per_s": state["tokens"] / max(state["train_time"], 1e-9),
        "peak_memory_bytes": peak_memory_bytes(), "final_train_loss": last_loss,
        "eval": ev, "attention": unwrapped.config.describe_attention(), "seq_len": stages[-1]["seq_len"],
        "world_size": world,
    }
    if main:
        final = out / "model"
        unwrapped.save_pretrained(final)
        tok.save(final)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        writer.close()
        plot_losses(metrics_path, out / "loss.png")
    accelerator.wait_for_everyone()
    return result


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    tr = [r for r in rows if r["type"] == "train"]
    ev = [r for r in rows if r["type"] == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train")
    if ev:
        ax.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
