"""`longctx bench hf`: Hugging Face models with attn_implementation "longctx" vs "sdpa" vs "eager".

Two modes (``modes:``), batch 1, randomly initialised models built from a config, so nothing is downloaded:
  forward  a forward pass without gradient of the base model;
  train    a finetuning step: forward, loss, backward and an AdamW step of the model with a
           sequence-classification head (ModernBertForSequenceClassification, MistralForSequenceClassification:
           2 labels, a pooled head, so no vocabulary-wide logits at n tokens hide the attention's memory).
           Time per step and tokens/s; peak = resident memory the timed steps add over the model and its
           AdamW state (made by the warm-up steps, which run on 256 tokens; with --warmup 0 the first
           step's AdamW state counts too).
``dtypes:`` float32, and/or bfloat16 = CPU autocast to bf16 over fp32 weights (mixed-precision training:
projections and attention products in bf16, master weights, softmax statistics and the optimizer in fp32);
bf16 cases are skipped on a CPU without bf16 matrix units.
The models keep the shapes that matter for attention and shrink the rest:
  modernbert  ModernBertModel, hidden 768, 12 heads, FFN 1152, local window 128 (one-sided 64), a global
              layer every third layer (ModernBERT-base's attention shape), 3 layers;
  mistral     MistralModel, hidden 1024, 16 query and 4 key-value heads (head 64), FFN 2816,
              sliding_window 4096 (Mistral 7B v0.1's window), 2 layers.
``hidden:`` (``--hidden``) narrows both, heads of 64 (benchmarks/hf-train.yaml trains at hidden 512).
The base models (no LM head): a 50k-vocabulary projection at 16k tokens would hide attention's memory.
Peak memory is the resident memory a forward (a step) adds over the loaded model, each case in its own
process. Eager attention holds H x n x n scores per layer (12 x 16k^2 fp32 = 12 GB; in training every
layer's probabilities are kept for backward): cases predicted over the memory cap (from the same case at a
shorter length, and never below eager's own n x n tensors, ``eager_bytes``) are skipped and say so. The
acceptance targets are the config's ``targets:`` section (see benchmarks/hf.yaml and hf-train.yaml).
"""
from __future__ import annotations

import contextlib
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from longctx.bench import common
from longctx.errors import LongctxError
from longctx.train.optim import adamw

DEFAULTS = {
    "name": "hf",
    "models": ["modernbert", "mistral"],
    "implementations": ["longctx", "sdpa", "eager"],
    "lengths": [4096, 16384],
    "modes": ["forward"],  # forward and/or train
    "dtypes": ["float32"],  # float32 and/or bfloat16 (autocast)
    "layers": None,  # None: each model's default above
    "hidden": None,  # None: each model's default above; else this width, heads of 64 (Mistral: 4 query heads
                     # per key-value head), FFN 1.5x (ModernBERT) or 2.75x (Mistral) the width
    "repeats": 2,
    "warmup": 1,
    "time_cap_s": 600.0,
    "memory_cap_gb": 16.0,
    "seed": 0,
    "targets": [],  # acceptance targets (common.check_targets); benchmarks/hf.yaml carries them
}
MODELS = ("modernbert", "mistral")
IMPLEMENTATIONS = ("longctx", "sdpa", "eager")
MODES = ("forward", "train")
WARMUP_TOKENS = 256  # a training warm-up step's length
DTYPES = ("float32", "bfloat16")


def build(name: str, layers: int | None, head: bool = False, hidden: int | None = None):
    """A randomly initialised base model of the shape above (``head``: with a 2-label classification head)."""
    import transformers

    if name == "modernbert":
        h = hidden or 768
        cfg = transformers.ModernBertConfig(
            vocab_size=50368, hidden_size=h, intermediate_size=h * 3 // 2, num_attention_heads=h // 64,
            num_hidden_layers=layers or 3, local_attention=128, global_attn_every_n_layers=3,
            max_position_embeddings=32768, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
            sep_token_id=2, num_labels=2)
        return (transformers.ModernBertForSequenceClassification if head else transformers.ModernBertModel)(cfg)
    if name == "mistral":
        h = hidden or 1024
        cfg = transformers.MistralConfig(
            vocab_size=32000, hidden_size=h, intermediate_size=h * 11 // 4, num_attention_heads=h // 64,
            num_key_value_heads=max(1, h // 256), head_dim=64, num_hidden_layers=layers or 2, sliding_window=4096,
            max_position_embeddings=32768, pad_token_id=0, num_labels=2)
        return (transformers.MistralForSequenceClassification if head else transformers.MistralModel)(cfg)
    raise LongctxError(f"benchmark model {name!r} is unknown; use one of {', '.join(MODELS)}")


def _precision(dtype: str):
    """bf16: CPU autocast over the fp32 weights; fp32: nothing."""
    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_case(spec: dict) -> dict:
    import longctx  # noqa: F401  (registers "longctx")
    from longctx.bench.train import bf16_units

    cfg, name, impl, n = spec["config"], spec["model"], spec["impl"], spec["n"]
    mode, dtype = spec.get("mode", "forward"), spec.get("dtype", "float32")
    if dtype == "bfloat16" and not bf16_units():
        return {"status": "skipped", "reason": "this CPU has no bf16 matrix units (avx512_bf16 / amx_bf16)"}
    torch.manual_seed(cfg["seed"])
    model = build(name, cfg["layers"], head=mode == "train", hidden=cfg.get("hidden"))
    model.set_attn_implementation(impl)
    ids = torch.randint(3, 30000, (1, n))
    mask = torch.ones(1, n, dtype=torch.long)
    if mode == "forward":
        model.eval()
        with torch.no_grad(), _precision(dtype), common.PeakMemory() as mem:
            times = common.timed(lambda: model(input_ids=ids, attention_mask=mask), cfg["repeats"], cfg["warmup"])
        return {"status": "ok", "times": times, "peak_bytes": mem.bytes, "peak_reset": mem.reset_ok}
    model.train()
    opt = adamw(model.parameters(), lr=1e-5)
    labels = torch.tensor([1])
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with _precision(dtype):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))

    # the warm-up steps run on a short input: they make AdamW's state and load the kernels at a fraction
    # of a long step's cost (the first step at n tokens is then a timed one, for every implementation alike)
    short = min(n, WARMUP_TOKENS)
    ids_n, mask_n = ids, mask
    ids, mask = ids_n[:, :short], mask_n[:, :short]
    common.timed(step, 0, cfg["warmup"])  # AdamW's state exists from here on
    ids, mask = ids_n, mask_n
    del losses[:]
    with common.PeakMemory() as mem:
        times = common.timed(step, cfg["repeats"], 0)
    return {"status": "ok", "times": times, "peak_bytes": mem.bytes, "peak_reset": mem.reset_ok,
            "loss_first": losses[0], "loss_last": losses[-1], "finite": all(math.isfinite(x) for x in losses)}


def eager_bytes(name: str, n: int, mode: str, dtype: str, layers: int | None, hidden: int | None = None) -> float:
    """A lower bound on what eager attention alone holds at n tokens: the (H, n, n) scores and their
    softmax of one layer in a forward; in training every layer's probabilities (kept for backward) plus
    one layer's scores and their gradient. fp32 scores; bf16 autocast keeps bf16 probabilities."""
    heads, default_layers = {"modernbert": (12, 3), "mistral": (16, 2)}[name]
    heads, layers = (hidden // 64 if hidden else heads), layers or default_layers
    one = heads * n * n
    if mode == "forward":
        return 2 * one * 4
    return layers * one * (2 if dtype == "bfloat16" else 4) + 2 * one * 4


def _predict(prev: dict | None, name: str, impl: str, n: int, mode: str, dtype: str, cfg: dict):
    """Time and memory at n from the same case at a shorter length: eager grows as n^2, the others
    (no n x n scores; SDPA's mask is n^2 booleans but small beside them) about as n. Eager's memory is
    never predicted below its own n x n tensors (``eager_bytes``), with or without a shorter case."""
    floor = eager_bytes(name, n, mode, dtype, cfg["layers"], cfg.get("hidden")) if impl == "eager" else None
    if prev is None or prev.get("status") != "ok":
        return None, floor
    r = n / prev["n"]
    mem = prev["peak_bytes"] * r ** (2 if impl == "eager" else 1)
    # time: every model here has a layer of full attention (SDPA's and eager's all are), n^2 at these lengths;
    # a training warm-up step is short (WARMUP_TOKENS) and not counted
    runs = cfg["repeats"] + (cfg["warmup"] if mode == "forward" else 0)
    return prev["time_s"] * r ** 2 * runs, max(mem, floor or 0)


def run(cfg: dict, out_dir: Path, command: str, log=print) -> dict:
    for name in cfg["models"]:
        if name not in MODELS:
            raise LongctxError(f"benchmark model {name!r} is unknown; use one of {', '.join(MODELS)}")
    for impl in cfg["implementations"]:
        if impl not in IMPLEMENTATIONS:
            raise LongctxError(f"attention implementation {impl!r} is unknown; use one of {', '.join(IMPLEMENTATIONS)}")
    for key, known in (("modes", MODES), ("dtypes", DTYPES)):
        for v in cfg[key]:
            if v not in known:
                raise LongctxError(f"benchmark {key[:-1]} {v!r} is unknown; use one of {', '.join(known)}")
    common.check_targets(cfg["targets"], "impl", IMPLEMENTATIONS)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"longctx bench hf -> {out_dir}")
    load_start = os.getloadavg()  # a shared machine's other work moves the times: say how much there was
    todo = [(mode, m, dt, n, i) for mode in cfg["modes"] for m in cfg["models"] for dt in cfg["dtypes"]
            for n in sorted(cfg["lengths"]) for i in cfg["implementations"]]
    cases, last = [], {}
    with common.progress(len(todo), "hf") as bar:
        for k, (mode, name, dt, n, impl) in enumerate(todo, 1):
            key = (mode, name, dt, impl)
            case = _case(name, impl, n, mode, dt, last.get(key), cfg)
            cases.append(case)
            if case["status"] != "skipped" or key not in last:
                last[key] = case
            if case["status"] != "ok":
                msg = f"{case['status']}: {case['reason']}"
            elif mode == "train":
                msg = (f"{case['tokens_per_s']:.0f} tokens/s, step {common.fmt_s(case['step_s'])} s, "
                       f"peak {common.fmt_bytes(case['peak_bytes'])}")
            else:
                msg = f"forward {common.fmt_s(case['forward_s'])} s, peak {common.fmt_bytes(case['peak_bytes'])}"
            bar.write(f"[{k}/{len(todo)}] {mode} {name} {dt} {impl} n={n}: {msg}")
            bar.update(1)
    result = {"schema": common.SCHEMA_VERSION, "benchmark": "hf", "name": cfg["name"],
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
              "config": cfg, "machine": common.machine_info(), "cases": cases,
              "load_average": {"start": list(load_start), "end": list(os.getloadavg())}}
    result["targets"] = targets(result)
    common.write_reports(result, out_dir, markdown(result))
    for t in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        log(f"target: {t['target']}: {t['measured']} -> {verdict}")
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}")
    return result


def _case(name: str, impl: str, n: int, mode: str, dtype: str, prev: dict | None, cfg: dict) -> dict:
    """Run one case in its own process (or say why not). ``time_s`` is the median time of one forward
    (``forward_s``) or one training step (``step_s``, with ``tokens_per_s``)."""
    case = {"model": name, "impl": impl, "n": n, "mode": mode, "dtype": dtype, "status": "ok", "reason": None}
    pred_t, pred_m = _predict(prev, name, impl, n, mode, dtype, cfg)
    reason = common.skip_reason(prev, impl, n, pred_t, pred_m, cfg)
    if reason:
        return {**case, "status": "skipped", "reason": reason}
    timeout = max(300.0, 3 * (pred_t or cfg["time_cap_s"]))
    spec = {"model": name, "impl": impl, "n": n, "mode": mode, "dtype": dtype, "config": cfg}
    case.update(common.run_child(__name__, spec, timeout))
    if case["status"] == "ok":
        case["time_s"] = common.median(case["times"])
        if mode == "train":
            case["step_s"] = case["time_s"]
            case["tokens_per_s"] = n / case["step_s"]
        else:
            case["forward_s"] = case["time_s"]
    return case


def targets(result: dict) -> list[dict]:
    """The config's targets on this run's numbers, each also as the two numbers it compares ("measured")."""
    out = []
    for t in result["config"].get("targets", []):
        row, a, b = common.evaluate_target(result, t, "impl")
        fmt = (common.fmt_bytes if t["field"].endswith("bytes") else
               (lambda x: f"{x:.0f}/s") if t["field"] == "tokens_per_s" else common.fmt_s)
        if row["value"] is None:
            row["measured"] = "-"
        elif b is None:
            row["measured"] = fmt(a)
        else:
            row["measured"] = f"{fmt(a)} vs {fmt(b)} ({row['value']:.3f}x)"
        out.append(row)
    return out


def markdown(result: dict) -> str:
    cfg, m = result["config"], result["machine"]
    lines = [f"# longctx bench hf: {result['name']}", "", f"`{result['command']}`", "",
             f"Batch 1, {m['cpu']} ({m['cores']} cores, torch {m['torch']}), {result['created']}; "
             f"{cfg['repeats']} timed runs (median) after {cfg['warmup']} warm-up. bfloat16 = CPU autocast over "
             "fp32 weights."]
    if "load_average" in result:
        la = result["load_average"]
        lines[-1] += (f" Load average (1, 5, 15 min) at the start {', '.join(f'{x:.2f}' for x in la['start'])}, "
                      f"at the end {', '.join(f'{x:.2f}' for x in la['end'])}.")
    for mode in MODES:
        rows = [c for c in result["cases"] if c.get("mode", "forward") == mode]
        if not rows:
            continue
        if mode == "forward":
            lines += ["", "Forward (no gradient) of the base model; peak = resident memory the forward adds over "
                      "the loaded model.", "",
                      "| model | n | dtype | impl | forward | peak memory | time vs sdpa | memory vs sdpa |",
                      "|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["", "Finetuning step (forward, classification loss, backward, AdamW); peak = resident memory "
                      "the timed steps add over the model and its AdamW state.", "",
                      "| model | n | dtype | impl | tokens/s | step | peak memory | tokens/s vs sdpa | "
                      "memory vs sdpa |", "|---|---|---|---|---|---|---|---|---|"]
        for c in rows:
            head = f"| {c['model']} | {c['n']:,} | {c.get('dtype', 'float32')} | {c['impl']} |"
            if c["status"] != "ok":
                lines.append(f"{head} {c['status']}: {c['reason']} | | | |" + (" |" if mode == "train" else ""))
                continue
            sdpa = {"model": c["model"], "impl": "sdpa", "n": c["n"], "mode": mode,
                    "dtype": c.get("dtype", "float32")}
            st, sm = (common.case_field(result, sdpa, f) for f in ("time_s", "peak_bytes"))
            rm = f"{c['peak_bytes'] / sm:.3f}x" if sm else "-"
            if mode == "forward":
                rt = f"{c['forward_s'] / st:.2f}x" if st else "-"
                lines.append(f"{head} {common.fmt_s(c['forward_s'])} s | {common.fmt_bytes(c['peak_bytes'])} | "
                             f"{rt} | {rm} |")
            else:
                rt = f"{st / c['step_s']:.2f}x" if st else "-"
                lines.append(f"{head} {c['tokens_per_s']:.0f} | {common.fmt_s(c['step_s'])} s | "
                             f"{common.fmt_bytes(c['peak_bytes'])} | {rt} | {rm} |")
    if result["targets"]:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {t['met']} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    common.child_main(run_case)
