"""`longctx bench hf`: Hugging Face models with attn_implementation "longctx" vs "sdpa" vs "eager".

Forward passes (no gradient, fp32, batch 1) of randomly initialised models built from a config, so
nothing is downloaded. The models keep the shapes that matter for attention and shrink the rest:
  modernbert  ModernBertModel, hidden 768, 12 heads, FFN 1152, local window 128 (one-sided 64), a global
              layer every third layer (ModernBERT-base's attention shape), 3 layers;
  mistral     MistralModel, hidden 1024, 16 query and 4 key-value heads (head 64), FFN 2816,
              sliding_window 4096 (Mistral 7B v0.1's window), 2 layers.
The base models (no LM head): a 50k-vocabulary projection at 16k tokens would hide attention's memory.
Peak memory is the resident memory a forward adds over the loaded model, each case in its own process.
Eager attention holds H x n x n scores per layer (12 x 16k^2 fp32 = 12 GB): cases predicted over the
memory cap are skipped and say so. The acceptance targets are the config's ``targets:`` section (see
benchmarks/hf.yaml).
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import torch

from longctx.bench import common
from longctx.errors import LongctxError

DEFAULTS = {
    "name": "hf",
    "models": ["modernbert", "mistral"],
    "implementations": ["longctx", "sdpa", "eager"],
    "lengths": [4096, 16384],
    "layers": None,  # None: each model's default above
    "repeats": 2,
    "warmup": 1,
    "time_cap_s": 600.0,
    "memory_cap_gb": 16.0,
    "seed": 0,
    "targets": [],  # acceptance targets (common.check_targets); benchmarks/hf.yaml carries them
}
MODELS = ("modernbert", "mistral")
IMPLEMENTATIONS = ("longctx", "sdpa", "eager")


def build(name: str, layers: int | None):
    """A randomly initialised base model of the shape above."""
    import transformers

    if name == "modernbert":
        cfg = transformers.ModernBertConfig(
            vocab_size=50368, hidden_size=768, intermediate_size=1152, num_attention_heads=12,
            num_hidden_layers=layers or 3, local_attention=128, global_attn_every_n_layers=3,
            max_position_embeddings=32768, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
            sep_token_id=2)
        return transformers.ModernBertModel(cfg)
    if name == "mistral":
        cfg = transformers.MistralConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
            num_key_value_heads=4, head_dim=64, num_hidden_layers=layers or 2, sliding_window=4096,
            max_position_embeddings=32768)
        return transformers.MistralModel(cfg)
    raise LongctxError(f"benchmark model {name!r} is unknown; use one of {', '.join(MODELS)}")


def run_case(spec: dict) -> dict:
    import longctx  # noqa: F401  (registers "longctx")

    cfg, name, impl, n = spec["config"], spec["model"], spec["impl"], spec["n"]
    torch.manual_seed(cfg["seed"])
    model = build(name, cfg["layers"]).eval()
    model.set_attn_implementation(impl)
    ids = torch.randint(3, 30000, (1, n))
    mask = torch.ones(1, n, dtype=torch.long)
    with torch.no_grad(), common.PeakMemory() as mem:
        times = common.timed(lambda: model(input_ids=ids, attention_mask=mask), cfg["repeats"], cfg["warmup"])
    return {"status": "ok", "times": times, "peak_bytes": mem.bytes, "peak_reset": mem.reset_ok}


def _predict(prev: dict | None, impl: str, n: int, cfg: dict):
    """Time and memory at n from the same case at a shorter length: eager grows as n^2, the others
    (no n x n scores; SDPA's mask is n^2 booleans but small beside them) about as n."""
    if prev is None or prev.get("status") != "ok":
        return None, None
    p = 2 if impl == "eager" else 1
    r = n / prev["n"]
    return prev["forward_s"] * r ** p * (cfg["repeats"] + cfg["warmup"]), prev["peak_bytes"] * r ** p


def run(cfg: dict, out_dir: Path, command: str, log=print) -> dict:
    for name in cfg["models"]:
        if name not in MODELS:
            raise LongctxError(f"benchmark model {name!r} is unknown; use one of {', '.join(MODELS)}")
    for impl in cfg["implementations"]:
        if impl not in IMPLEMENTATIONS:
            raise LongctxError(f"attention implementation {impl!r} is unknown; use one of {', '.join(IMPLEMENTATIONS)}")
    common.check_targets(cfg["targets"], "impl", IMPLEMENTATIONS)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"longctx bench hf -> {out_dir}")
    todo = [(m, n, i) for m in cfg["models"] for n in sorted(cfg["lengths"]) for i in cfg["implementations"]]
    cases, last = [], {}
    with common.progress(len(todo), "hf") as bar:
        for k, (name, n, impl) in enumerate(todo, 1):
            case = _case(name, impl, n, last.get((name, impl)), cfg)
            cases.append(case)
            if case["status"] != "skipped" or (name, impl) not in last:
                last[(name, impl)] = case
            msg = (f"forward {common.fmt_s(case['forward_s'])} s, peak {common.fmt_bytes(case['peak_bytes'])}"
                   if case["status"] == "ok" else f"{case['status']}: {case['reason']}")
            bar.write(f"[{k}/{len(todo)}] {name} {impl} n={n}: {msg}")
            bar.update(1)
    result = {"schema": common.SCHEMA_VERSION, "benchmark": "hf", "name": cfg["name"],
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
              "config": cfg, "machine": common.machine_info(), "cases": cases}
    result["targets"] = targets(result)
    common.write_reports(result, out_dir, markdown(result))
    for t in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        log(f"target: {t['target']}: {t['measured']} -> {verdict}")
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}")
    return result


def _case(name: str, impl: str, n: int, prev: dict | None, cfg: dict) -> dict:
    """Run one case in its own process (or say why not)."""
    case = {"model": name, "impl": impl, "n": n, "status": "ok", "reason": None}
    pred_t, pred_m = _predict(prev, impl, n, cfg)
    reason = common.skip_reason(prev, impl, n, pred_t, pred_m, cfg)
    if reason:
        return {**case, "status": "skipped", "reason": reason}
    timeout = max(300.0, 3 * (pred_t or cfg["time_cap_s"]))
    case.update(common.run_child(__name__, {"model": name, "impl": impl, "n": n, "config": cfg}, timeout))
    if case["status"] == "ok":
        case["forward_s"] = common.median(case["times"])
    return case


def targets(result: dict) -> list[dict]:
    """The config's targets on this run's numbers, each also as the two numbers it compares ("measured")."""
    out = []
    for t in result["config"].get("targets", []):
        row, a, b = common.evaluate_target(result, t, "impl")
        fmt = common.fmt_bytes if t["field"].endswith("bytes") else common.fmt_s
        if row["value"] is None:
            row["measured"] = "-"
        elif b is None:
            row["measured"] = fmt(a)
        else:
            row["measured"] = f"{fmt(a)} vs {fmt(b)} ({row['value']:.3f}x)"
        out.append(row)
    return out


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# longctx bench hf: {result['name']}", "", f"`{result['command']}`", "",
             f"Forward, fp32, batch 1, {result['machine']['cpu']} ({result['machine']['cores']} cores), "
             f"{cfg['repeats']} timed runs (median) after {cfg['warmup']} warm-up; peak = resident memory the "
             "forward adds over the loaded model.", "",
             "| model | n | impl | forward | peak memory | time vs sdpa | memory vs sdpa |",
             "|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        if c["status"] != "ok":
            lines.append(f"| {c['model']} | {c['n']:,} | {c['impl']} | {c['status']}: {c['reason']} | | | |")
            continue
        sdpa = {"model": c["model"], "impl": "sdpa", "n": c["n"]}
        st, sm = (common.case_field(result, sdpa, f) for f in ("forward_s", "peak_bytes"))
        rt = f"{c['forward_s'] / st:.2f}x" if st else "-"
        rm = f"{c['peak_bytes'] / sm:.3f}x" if sm else "-"
        lines.append(f"| {c['model']} | {c['n']:,} | {c['impl']} | {common.fmt_s(c['forward_s'])} s | "
                     f"{common.fmt_bytes(c['peak_bytes'])} | {rt} | {rm} |")
    if result["targets"]:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {t['met']} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    common.child_main(run_case)
