"""`longctx bench train`: a full masked-LM training step (forward, loss, backward, AdamW step).

Models, all of the same shape (layers, hidden, heads, FFN 4 x hidden, vocabulary 30,522), batch 1:
  longctx                 LongctxForMaskedLM, sliding window (one-sided window/2), blocked kernel
  longctx-bf16            the same under CPU autocast to bf16 (train.bf16=true): projections, FFN and the
                          attention products in bf16, softmax statistics and master weights in fp32; skipped
                          on a CPU without bf16 matrix units (avx512_bf16 / amx_bf16 in /proc/cpuinfo)
  hf-longformer           transformers' LongformerForMaskedLM, attention_window = window
  hf-roberta-sdpa         transformers' RobertaForMaskedLM, full attention, attn_implementation="sdpa"
15% of the positions are labelled (the rest -100), as in BERT pretraining. Note the heads differ in
design: longctx's MLM head projects only the labelled positions onto the vocabulary, Hugging Face's
heads project every position, and at this size the vocabulary projection is most of the step's FLOPs.
Hidden dropout is 0.1 everywhere; attention-probability dropout is off (longctx's kernel has none).
Each case runs in its own process; tokens/s = tokens per step / median step time. The acceptance
targets are the config's ``targets:`` section (see benchmarks/train.yaml).
"""
from __future__ import annotations

import contextlib
import math
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import LongformerConfig, LongformerForMaskedLM, RobertaConfig, RobertaForMaskedLM

from longctx import plots
from longctx.attention import fused
from longctx.bench import common
from longctx.errors import LongctxError
from longctx.train.optim import adamw
from longctx.models import LongctxConfig, LongctxForMaskedLM

DEFAULTS = {
    "name": "train",
    "layers": 4,
    "hidden": 256,
    "heads": 4,
    "vocab": 30522,
    "attention_window": 512,  # two-sided, named as Hugging Face's (longctx window = half)
    "batch": 1,
    "lengths": [4096, 65536],
    "models": ["longctx", "longctx-bf16", "hf-longformer", "hf-roberta-sdpa"],
    "heldout_steps": 40,  # the short run whose held-out loss compares bf16 with fp32 (longctx models only)
    "mask_fraction": 0.15,
    "repeats": 3,
    "warmup": 1,
    "time_cap_s": 600.0,
    "memory_cap_gb": 20.0,
    "seed": 0,
    "targets": [],  # acceptance targets (common.check_targets); benchmarks/train.yaml carries them
}
MODELS = DEFAULTS["models"]
SCALING = {"hf-roberta-sdpa": (2, 1)}  # time and memory grow as n^p


def build(name: str, n: int, cfg: dict):
    L, D, H, V, w = cfg["layers"], cfg["hidden"], cfg["heads"], cfg["vocab"], cfg["attention_window"]
    if name in ("longctx", "longctx-bf16"):
        mc = LongctxConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                           intermediate_size=4 * D, window=w // 2, max_position_embeddings=n,
                           attention="sliding", attention_backend="blocked")
        return LongctxForMaskedLM(mc), 0
    if name == "hf-longformer":
        if n % w:
            raise LongctxError(f"Hugging Face's Longformer needs n to be a multiple of {w}")
        mc = LongformerConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                              intermediate_size=4 * D, attention_window=w, max_position_embeddings=n + 2,
                              attention_probs_dropout_prob=0.0, pad_token_id=1)
        return LongformerForMaskedLM(mc), 1
    if name == "hf-roberta-sdpa":
        mc = RobertaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                           intermediate_size=4 * D, max_position_embeddings=n + 2,
                           attention_probs_dropout_prob=0.0, pad_token_id=1, attn_implementation="sdpa")
        model = RobertaForMaskedLM(mc)
        if model.config._attn_implementation != "sdpa":
            raise LongctxError(f"RobertaForMaskedLM did not take attn_implementation='sdpa' "
                               f"(got {model.config._attn_implementation!r})")
        return model, 1
    raise LongctxError(f"benchmark model {name!r} is unknown; use one of {', '.join(MODELS)}")


def bf16_units() -> bool:
    """The CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _precision(name: str):
    """The autocast of a model's forward: bf16 on CPU for the -bf16 model (weights stay fp32)."""
    if name.endswith("-bf16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _chain_batch(g: torch.Generator, n: int, perm: torch.Tensor, mask_fraction: float):
    """A learnable sequence: token t+1 = perm[token t] (90%) or a random one of 64 ids; BERT-style labels."""
    ids = torch.empty(1, n, dtype=torch.long)
    ids[0, 0] = int(torch.randint(64, (1,), generator=g))
    noise = torch.rand(n, generator=g) < 0.1
    rand = torch.randint(64, (n,), generator=g)
    for t in range(1, n):
        ids[0, t] = rand[t] if noise[t] else perm[ids[0, t - 1]]
    ids = ids + 5
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(1, n, generator=g) < mask_fraction
    labels[chosen] = ids[chosen]
    inputs = ids.masked_fill(chosen, 4)  # 4: the mask token
    return inputs, labels


def heldout_loss(name: str, cfg: dict, n: int = 1024) -> float:
    """Train ``heldout_steps`` steps on a learnable synthetic chain, then the fp32 loss on held-out
    sequences: bf16 and fp32 start from the same weights and see the same batches."""
    torch.manual_seed(cfg["seed"])
    model, _ = build(name, n, cfg)
    opt = adamw(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(cfg["seed"])
    perm = torch.randperm(64, generator=g)
    model.train()
    for _ in range(cfg["heldout_steps"]):
        ids, labels = _chain_batch(g, n, perm, cfg["mask_fraction"])
        opt.zero_grad(set_to_none=True)
        with _precision(name):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
    model.eval()
    held = torch.Generator().manual_seed(cfg["seed"] + 1)
    with torch.no_grad():
        return sum(float(model(input_ids=i, labels=lab).loss) for i, lab in
                   (_chain_batch(held, n, perm, cfg["mask_fraction"]) for _ in range(4))) / 4


def run_case(spec: dict) -> dict:
    cfg, name, n = spec["config"], spec["model"], spec["n"]
    if name.endswith("-bf16") and not bf16_units():
        return {"status": "skipped", "reason": "this CPU has no bf16 matrix units (avx512_bf16 / amx_bf16)"}
    torch.manual_seed(cfg["seed"])
    B = cfg["batch"]
    with common.PeakMemory() as mem:
        model, pad = build(name, n, cfg)
        model.train()
        opt = adamw(model.parameters(), lr=1e-4)
        ids = torch.randint(5, cfg["vocab"], (B, n))
        labels = torch.full((B, n), -100)
        chosen = torch.rand(B, n) < cfg["mask_fraction"]
        labels[chosen] = ids[chosen]
        attn = torch.ones(B, n, dtype=torch.long)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            with _precision(name):
                loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(float(loss))
        times = common.timed(step, cfg["repeats"], cfg["warmup"])
    extra = {}
    if name.startswith("longctx") and n == min(cfg["lengths"]) and cfg.get("heldout_steps", 0) > 0:
        extra["heldout_loss"] = heldout_loss(name, cfg)
    return {"status": "ok", **extra, "step_times": times, "peak_bytes": mem.bytes, "peak_reset": mem.reset_ok,
            "loss_first": losses[0], "loss_last": losses[-1], "finite": all(math.isfinite(x) for x in losses),
            "parameters": sum(p.numel() for p in model.parameters())}


def _predict(prev, name, n, cfg):
    if prev is None or prev.get("status") != "ok":
        return None, None
    pt, pm = SCALING.get(name, (1, 1))
    r = n / prev["n"]
    return prev["step_s"] * r ** pt * (cfg["repeats"] + cfg["warmup"]), prev["peak_bytes"] * r ** pm


def run(cfg: dict, out_dir: Path, command: str, log=print) -> dict:
    for name in cfg["models"]:
        if name not in MODELS:
            raise LongctxError(f"benchmark model {name!r} is unknown; use one of {', '.join(MODELS)}")
    common.check_targets(cfg["targets"], "model", MODELS)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"longctx bench train -> {out_dir}")
    mm = {}
    if "longctx-bf16" in cfg["models"]:  # the bf16 target is relative to this machine's own matmul ratio
        log("fused CPU kernel: " + ("ready" if fused.load() else f"unavailable ({fused._state['why_not']})"))
        for dt in ("float32", "bfloat16"):
            r = common.run_child(__name__, {"matmul": dt}, timeout=300)
            if r.get("status") == "ok":
                mm[dt] = r["gflops"]
                log(f"matrix product reference ({dt}): {mm[dt]:.1f} GFLOP/s")
    todo = [(n, m) for n in sorted(cfg["lengths"]) for m in cfg["models"]]
    cases, last = [], {}
    with common.progress(len(todo), "train") as bar:
        for i, (n, name) in enumerate(todo, 1):
            case = _case(name, n, last.get(name), cfg)
            cases.append(case)
            if case["status"] != "skipped" or name not in last:
                last[name] = case
            msg = (f"{case['tokens_per_s']:.0f} tokens/s, step {common.fmt_s(case['step_s'])} s, "
                   f"peak {common.fmt_bytes(case['peak_bytes'])}" if case["status"] == "ok"
                   else f"{case['status']}: {case['reason']}")
            bar.write(f"[{i}/{len(todo)}] {name} n={n}: {msg}")
            bar.update(1)
    result = {"schema": common.SCHEMA_VERSION, "benchmark": "train", "name": cfg["name"],
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
              "config": cfg, "machine": common.machine_info(), "matmul_gflops": mm, "cases": cases}
    result["targets"] = common.evaluate_targets(result, "model")
    common.write_reports(result, out_dir, markdown(result))
    plot(result, out_dir)
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'tokens_per_s.png'}")
    return result


def _case(name: str, n: int, prev: dict | None, cfg: dict) -> dict:
    """Run one case in its own process (or say why not) and derive its rate."""
    case = {"model": name, "n": n, "batch": cfg["batch"], "status": "ok", "reason": None}
    pred_t, pred_m = _predict(prev, name, n, cfg)
    reason = common.skip_reason(prev, name, n, pred_t, pred_m, cfg)
    if reason:
        return {**case, "status": "skipped", "reason": reason}
    timeout = max(300.0, 3 * (pred_t or cfg["time_cap_s"]))
    case.update(common.run_child(__name__, {"model": name, "n": n, "config": cfg}, timeout))
    if case["status"] == "ok":
        case["step_s"] = common.median(case["step_times"])
        case["tokens_per_s"] = n * cfg["batch"] / case["step_s"]
    return case


def markdown(result: dict) -> str:
    m, c = result["machine"], result["config"]
    lines = [f"# Training-step benchmark: {result['name']}", "",
             f"`{result['command']}` on {m['cpu']} ({m['cores']} cores, torch {m['torch']}), {result['created']}.",
             "", f"Masked-LM step (forward, loss, backward, AdamW), {c['layers']} layers, hidden {c['hidden']}, "
             f"{c['heads']} heads, vocabulary {c['vocab']}, attention_window {c['attention_window']} (two-sided), batch {c['batch']}; "
             f"median of {c['repeats']} steps after {c['warmup']} warm-up."
             + (" Matrix-product reference: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in result["matmul_gflops"].items())
                + f"; the fused kernel's bf16 products: {m.get('fused_bf16_products', 'not recorded')}."
                if result.get("matmul_gflops") else ""), "",
             "| model | n | tokens/s | step s | peak memory | loss first -> last |", "|---|---:|---:|---:|---:|---|"]
    for x in result["cases"]:
        if x["status"] == "ok":
            lines.append(f"| {x['model']} | {x['n']} | {x['tokens_per_s']:.0f} | {common.fmt_s(x['step_s'])} | "
                         f"{common.fmt_bytes(x['peak_bytes'])} | {x['loss_first']:.2f} -> {x['loss_last']:.2f} |")
        else:
            lines.append(f"| {x['model']} | {x['n']} | {x['status']}: {x['reason']} | | | |")
    lines += common.targets_markdown(result["targets"])
    return "\n".join(lines) + "\n"


def plot(result: dict, out_dir: Path) -> None:
    fig, axes = plots.pyplot().subplots(1, 2, figsize=(10, 4.5))
    series = {}
    for x in result["cases"]:
        if x["status"] == "ok":
            series.setdefault(x["model"], []).append((x["n"], x["tokens_per_s"], x["peak_bytes"] / 2**30))
    for name, pts in series.items():
        ns, tps, mem = zip(*sorted(pts))
        axes[0].plot(ns, tps, marker="o", label=name)
        axes[1].plot(ns, [max(m, 1e-3) for m in mem], marker="o", label=name)
    for ax, lab in zip(axes, ("tokens/s", "peak memory (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    plots.save(fig, out_dir / "tokens_per_s.png", dpi=110)


if __name__ == "__main__":
    common.child_main(run_case)
