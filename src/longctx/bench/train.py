"""`longctx bench train`: a full masked-LM training step (forward, loss, backward, AdamW step).

Models, all of the same shape (layers, hidden, heads, FFN 4 x hidden, vocabulary 30,522), batch 1:
  longctx                 LongctxForMaskedLM, sliding window (one-sided window/2), blocked kernel
  hf-longformer           transformers' LongformerForMaskedLM, attention_window = window
  hf-roberta-sdpa         transformers' RobertaForMaskedLM, full attention, attn_implementation="sdpa"
15% of the positions are labelled (the rest -100), as in BERT pretraining. Note the heads differ in
design: longctx's MLM head projects only the labelled positions onto the vocabulary, Hugging Face's
heads project every position, and at this size the vocabulary projection is most of the step's FLOPs.
Hidden dropout is 0.1 everywhere; attention-probability dropout is off (longctx's kernel has none).
Each case runs in its own process; tokens/s = tokens per step / median step time.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from longctx.bench import common
from longctx.errors import LongctxError

DEFAULTS = {
    "name": "train",
    "layers": 4,
    "hidden": 256,
    "heads": 4,
    "vocab": 30522,
    "attention_window": 512,  # two-sided, named as Hugging Face's (longctx window = half)
    "batch": 1,
    "lengths": [4096, 65536],
    "models": ["longctx", "hf-longformer", "hf-roberta-sdpa"],
    "mask_fraction": 0.15,
    "repeats": 3,
    "warmup": 1,
    "time_cap_s": 600.0,
    "memory_cap_gb": 20.0,
    "seed": 0,
}
MODELS = DEFAULTS["models"]
SCALING = {"hf-roberta-sdpa": (2, 1)}  # time and memory grow as n^p


def build(name: str, n: int, cfg: dict):
    L, D, H, V, w = cfg["layers"], cfg["hidden"], cfg["heads"], cfg["vocab"], cfg["attention_window"]
    if name == "longctx":
        from longctx.models import LongctxConfig, LongctxForMaskedLM
        mc = LongctxConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                           intermediate_size=4 * D, window=w // 2, max_position_embeddings=n,
                           attention="sliding", attention_backend="blocked")
        return LongctxForMaskedLM(mc), 0
    if name == "hf-longformer":
        from transformers import LongformerConfig, LongformerForMaskedLM
        if n % w:
            raise LongctxError(f"Hugging Face's Longformer needs n to be a multiple of {w}")
        mc = LongformerConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                              intermediate_size=4 * D, attention_window=w, max_position_embeddings=n + 2,
                              attention_probs_dropout_prob=0.0, pad_token_id=1)
        return LongformerForMaskedLM(mc), 1
    if name == "hf-roberta-sdpa":
        from transformers import RobertaConfig, RobertaForMaskedLM
        mc = RobertaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                           intermediate_size=4 * D, max_position_embeddings=n + 2,
                           attention_probs_dropout_prob=0.0, pad_token_id=1, attn_implementation="sdpa")
        model = RobertaForMaskedLM(mc)
        if model.config._attn_implementation != "sdpa":
            raise LongctxError(f"RobertaForMaskedLM did not take attn_implementation='sdpa' "
                               f"(got {model.config._attn_implementation!r})")
        return model, 1
    raise LongctxError(f"benchmark model {name!r} is unknown; use one of {', '.join(MODELS)}")


def run_case(spec: dict) -> dict:
    cfg, name, n = spec["config"], spec["model"], spec["n"]
    torch.manual_seed(cfg["seed"])
    B = cfg["batch"]
    with common.PeakMemory() as mem:
        model, pad = build(name, n, cfg)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(5, cfg["vocab"], (B, n))
        labels = torch.full((B, n), -100)
        chosen = torch.rand(B, n) < cfg["mask_fraction"]
        labels[chosen] = ids[chosen]
        attn = torch.ones(B, n, dtype=torch.long)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(float(loss))
        times = common.timed(step, cfg["repeats"], cfg["warmup"])
    return {"status": "ok", "step_times": times, "peak_bytes": mem.bytes, "peak_reset": mem.reset_ok,
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
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"longctx bench train -> {out_dir}")
    todo = [(n, m) for n in sorted(cfg["lengths"]) for m in cfg["models"]]
    cases, last, t0 = [], {}, time.time()
    for i, (n, name) in enumerate(todo, 1):
        case = {"model": name, "n": n, "batch": cfg["batch"], "status": "ok", "reason": None}
        prev = last.get(name)
        pred_t, pred_m = _predict(prev, name, n, cfg)
        reason = common.skip_reason(prev, name, n, pred_t, pred_m, cfg)
        if reason:
            case.update(status="skipped", reason=reason)
        else:
            timeout = max(300.0, 3 * (pred_t or cfg["time_cap_s"]))
            case.update(common.run_child(__name__, {"model": name, "n": n, "config": cfg}, timeout))
        if case["status"] == "ok":
            case["step_s"] = common.median(case["step_times"])
            case["tokens_per_s"] = n * cfg["batch"] / case["step_s"]
        cases.append(case)
        if case["status"] != "skipped" or name not in last:
            last[name] = case
        el = time.time() - t0
        msg = (f"{case['tokens_per_s']:.0f} tokens/s, step {common.fmt_s(case['step_s'])} s, "
               f"peak {common.fmt_bytes(case['peak_bytes'])}" if case["status"] == "ok"
               else f"{case['status']}: {case['reason']}")
        log(f"[{i}/{len(todo)}] {name} n={n}: {msg}  (elapsed {el:.0f} s, ETA {el / i * (len(todo) - i):.0f} s)")
    result = {"schema": common.SCHEMA_VERSION, "benchmark": "train", "name": cfg["name"],
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
              "config": cfg, "machine": common.machine_info(), "cases": cases}
    result["targets"] = targets(result)
    common.write_atomic(out_dir / "results.json", json.dumps(result, indent=1))
    common.write_atomic(out_dir / "results.md", markdown(result))
    plot(result, out_dir)
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'tokens_per_s.png'}")
    return result


def _get(result, name, n, field):
    for c in result["cases"]:
        if c["model"] == name and c["n"] == n and c["status"] == "ok":
            return c[field]
    return None


def targets(result: dict) -> list[dict]:
    out = []
    ours, hf = _get(result, "longctx", 4096, "tokens_per_s"), _get(result, "hf-longformer", 4096, "tokens_per_s")
    v = None if None in (ours, hf) else ours / hf
    out.append({"target": "training tokens/s over HF Longformer at 4096", "value": v, "goal": ">= 3",
                "met": None if v is None else v >= 3})
    peak = _get(result, "longctx", 65536, "peak_bytes")
    out.append({"target": "training step at 65536 tokens: peak GB", "value": None if peak is None else peak / 2**30,
                "goal": "<= 24", "met": None if peak is None else peak < 24 * 2**30})
    return out


def markdown(result: dict) -> str:
    m, c = result["machine"], result["config"]
    lines = [f"# Training-step benchmark: {result['name']}", "",
             f"`{result['command']}` on {m['cpu']} ({m['cores']} cores, torch {m['torch']}), {result['created']}.",
             "", f"Masked-LM step (forward, loss, backward, AdamW), {c['layers']} layers, hidden {c['hidden']}, "
             f"{c['heads']} heads, vocabulary {c['vocab']}, attention_window {c['attention_window']} (two-sided), batch {c['batch']}; "
             f"median of {c['repeats']} steps after {c['warmup']} warm-up.", "",
             "| model | n | tokens/s | step s | peak memory | loss first -> last |", "|---|---:|---:|---:|---:|---|"]
    for x in result["cases"]:
        if x["status"] == "ok":
            lines.append(f"| {x['model']} | {x['n']} | {x['tokens_per_s']:.0f} | {common.fmt_s(x['step_s'])} | "
                         f"{common.fmt_bytes(x['peak_bytes'])} | {x['loss_first']:.2f} -> {x['loss_last']:.2f} |")
        else:
            lines.append(f"| {x['model']} | {x['n']} | {x['status']}: {x['reason']} | | | |")
    lines += ["", "| target | value | goal | met |", "|---|---:|---|---|"]
    for t in result["targets"]:
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['target']} | {v} | {t['goal']} | "
                     f"{'n/a' if t['met'] is None else ('yes' if t['met'] else '**no**')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
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
    fig.tight_layout()
    tmp = out_dir / "tokens_per_s.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_dir / "tokens_per_s.png")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    print(json.dumps(run_case(json.loads(Path(p.parse_args().child).read_text()))))
    sys.exit(0)
