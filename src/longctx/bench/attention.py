"""`longctx bench attention`: one self-attention layer, every implementation, the same shapes.

Each case is one implementation at one length and dtype, run in its own process (see ``common``):
forward (inference, no autograd graph) and forward+backward (a training step of the layer: output
projection included, gradient of a random upstream) wall times, median of ``repeats`` runs after
``warmup``, and the peak resident memory each phase added. Useful FLOPs count the projections and only
the query-key pairs the pattern allows (``AttentionPattern.attended_pairs``): 4 * pairs * head_dim per
head forward (QK^T and PV), three times that for forward+backward; recomputation is not useful work.

Implementations ("impl" in the results):
  longctx-sliding          SelfAttention, sliding window (one-sided window/2), blocked kernel
  longctx-sliding-half     the same with half the window
  longctx-dilated          sliding window, dilation 2 on the last 2 heads (Longformer's upper layers)
  longctx-blocks           disjoint blocks of size `window` (Xiong et al.)
  longctx-global16         sliding window + the first 16 tokens global, separate global projections
  longctx-blockwise-causal LeX blockwise causal, block `window`
  longctx-causal           causal sliding window of window/2 (the local-attention comparison)
  core-sliding, core-sliding-half   the attention core alone (q, k, v given): kernel throughput
  ...-torch                the same case on the pure-PyTorch blocked kernel (backend "blocked-torch"):
                           without the suffix, backend "blocked" runs the fused C++ kernel where it builds
  sdpa-dense               the same layer with full attention through PyTorch SDPA, no mask
  sdpa-masked              SDPA with the sliding pattern's n x n boolean mask
  hf-longformer            transformers' LongformerSelfAttention (attention_window = window) + output proj.
  local-attention          lucidrains' local-attention (causal, window_size window/2, look_backward 1)
  longctx-linformer        the Linformer mechanism (k = 256, E/F per layer) in the same projected layer
  longctx-performer        Performer FAVOR+ (256 orthogonal random features)
  longctx-nystrom          Nystromformer (64 landmarks, conv skip 33)
  longctx-lsh              Reformer LSH attention (chunk 64, 64 buckets, 2 hashes; shared QK projection)
  The families' useful FLOPs are their mechanisms' own ``flops(n)`` plus the projections.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from longctx.bench import common
from longctx.errors import LongctxError

DEFAULTS = {
    "name": "attention",
    "hidden": 768,
    "heads": 12,
    "attention_window": 512,  # two-sided, named as Hugging Face's; longctx's one-sided window is half
    "global_tokens": 16,
    "batch": 1,
    "lengths": [1024, 2048, 4096, 8192, 16384, 32768, 65536],
    "implementations": ["longctx-sliding", "longctx-sliding-half", "longctx-dilated", "longctx-blocks",
                        "longctx-global16", "longctx-blockwise-causal", "longctx-causal", "core-sliding",
                        "core-sliding-half", "sdpa-dense", "sdpa-masked", "hf-longformer", "local-attention",
                        "longctx-linformer", "longctx-performer", "longctx-nystrom", "longctx-lsh",
                        "longctx-sliding-torch", "core-sliding-torch", "core-sliding-half-torch"],
    "dtypes": ["float32"],
    "repeats": 5,
    "warmup": 1,
    "time_cap_s": 300.0,  # skip a case whose predicted total run time exceeds this
    "memory_cap_gb": 12.0,  # skip a case whose predicted peak exceeds this
    "seed": 0,
}

# time and memory grow as n^p: used to predict the next length from the last measured one
SCALING = {"sdpa-dense": (2, 1), "sdpa-masked": (2, 2)}
IMPLS = DEFAULTS["implementations"]
TORCH_KERNEL = "-torch"  # suffix: the case on the pure-PyTorch blocked kernel, beside the fused one


def _base(impl: str) -> str:
    return impl[:-len(TORCH_KERNEL)] if impl.endswith(TORCH_KERNEL) else impl

# the approximate families: implementation -> (mechanism, its config keys); the papers' usual settings
FAMILIES = {
    "longctx-linformer": ("linformer", {"k": 256, "share": "headwise"}),
    "longctx-performer": ("performer", {"nb_features": 256}),
    "longctx-nystrom": ("nystrom", {"num_landmarks": 64, "conv_kernel_size": 33}),
    "longctx-lsh": ("lsh", {"chunk_length": 64, "num_buckets": 64, "n_hashes": 2}),
}


def _mechanism(impl: str, n: int, cfg: dict):
    import longctx.attention  # noqa: F401  (registers the families)
    from longctx.attention.mechanism import LayerContext, build as build_mechanism
    name, fields = FAMILIES[impl]
    ctx = LayerContext(num_heads=cfg["heads"], head_dim=cfg["hidden"] // cfg["heads"], max_len=n, seed=cfg["seed"])
    return build_mechanism(name, fields, ctx)


# -- building one case (in the child) -----------------------------------------------------------------------
def _pattern(impl: str, cfg: dict):
    from longctx.attention import AttentionPattern
    impl = _base(impl)
    w, H = cfg["attention_window"], cfg["heads"]
    if impl in ("longctx-sliding", "core-sliding", "longctx-global16", "sdpa-masked", "hf-longformer"):
        return AttentionPattern("sliding", window=w // 2)
    if impl in ("longctx-sliding-half", "core-sliding-half"):
        return AttentionPattern("sliding", window=w // 4)
    if impl == "longctx-dilated":
        return AttentionPattern("sliding", window=w // 2, dilation=(1,) * (H - 2) + (2, 2))
    if impl == "longctx-blocks":
        return AttentionPattern("blocks", block=w)
    if impl == "longctx-blockwise-causal":
        return AttentionPattern("blockwise_causal", block=w)
    if impl in ("longctx-causal", "local-attention"):
        return AttentionPattern("sliding", window=w // 2, causal=True)
    return AttentionPattern("full")


def attended_pairs(impl: str, n: int, cfg: dict) -> float:
    """Allowed (query, key) pairs per head: the useful work of the attention core."""
    H, w = cfg["heads"], cfg["attention_window"]
    impl = _base(impl)
    if impl == "sdpa-dense":
        return float(n) * n
    if impl == "local-attention":
        # buckets of W: a query sees its own bucket causally and the whole previous bucket
        W = w // 2
        i = torch.arange(n, dtype=torch.float64)
        return float(((i % W) + 1 + torch.where(i >= W, W, 0)).sum())
    pattern = _pattern(impl, cfg)
    if impl == "longctx-global16":
        G, half = min(cfg["global_tokens"], n), w // 2
        i = torch.arange(G, n, dtype=torch.float64)
        local = (torch.minimum(i + half, torch.tensor(n - 1.0)) - torch.maximum(i - half, torch.tensor(float(G))) + 1)
        return float(G * n + (local + G).sum())
    return pattern.attended_pairs(n, H)


def useful_flops(impl: str, n: int, cfg: dict) -> tuple[float, float]:
    """(forward, forward+backward) useful FLOPs of the case."""
    B, D, H = cfg["batch"], cfg["hidden"], cfg["heads"]
    d = D // H
    if impl in FAMILIES:
        attn = _mechanism(impl, n, cfg).flops(n) * B
    else:
        attn = 4.0 * attended_pairs(impl, n, cfg) * d * H * B
    n_proj = 0 if impl.startswith("core-") else (7 if impl == "longctx-global16" else 3 if impl == "longctx-lsh" else 4)
    proj = 2.0 * B * n * D * D * n_proj
    return attn + proj, 3 * (attn + proj)


class _ProjectedLayer(torch.nn.Module):
    """q, k, v projections -> an attention core (B, H, n, d) -> output projection: the layer shape every
    peer runs in, so their times compare with longctx's SelfAttention."""

    def __init__(self, hidden: int, heads: int, core, shared_qk: bool = False):
        super().__init__()
        self.heads, self.core = heads, core
        self.query, self.value = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, hidden)
        # Reformer's shared query-key projection: the LSH mechanism takes k = q
        self.key = self.query if shared_qk else torch.nn.Linear(hidden, hidden)
        self.shared_qk = shared_qk
        self.out = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        B, n, D = x.shape
        split = lambda t: t.view(B, n, self.heads, -1).transpose(1, 2)  # noqa: E731  (B, H, n, d)
        q, v = split(self.query(x)), split(self.value(x))
        k = q if self.shared_qk else split(self.key(x))
        return self.out(self.core(q, k, v).transpose(1, 2).reshape(B, n, D))


class _HFLayer(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, window: int):
        super().__init__()
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
        cfg = LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[window],
                               attention_probs_dropout_prob=0.0)
        self.attn = LongformerSelfAttention(cfg, layer_id=0)
        self.out = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        B, n, _ = x.shape
        none = torch.zeros(B, n, dtype=torch.bool)
        # HF's mask encoding: -10000 padding, 0 local, +10000 global; here every token is local
        h = self.attn(x, attention_mask=torch.zeros(B, n, dtype=x.dtype), is_index_masked=none,
                      is_index_global_attn=none, is_global_attn=False)[0]
        return self.out(h)


def build(impl: str, n: int, cfg: dict, dtype: torch.dtype):
    """(module or None, inputs, forward function): forward(inputs) -> the output tensor."""
    from longctx.attention import SelfAttention, attention
    from longctx.attention.patterns import full_mask
    B, D, H, w = cfg["batch"], cfg["hidden"], cfg["heads"], cfg["attention_window"]
    pattern = _pattern(impl, cfg)
    backend = "blocked-torch" if impl.endswith(TORCH_KERNEL) else "blocked"
    impl = _base(impl)
    if impl.startswith("core-"):
        qkv = [torch.randn(B, H, n, D // H, dtype=dtype, requires_grad=True) for _ in range(3)]
        return None, qkv, lambda q, k, v: attention(q, k, v, pattern, backend=backend)
    x = torch.randn(B, n, D, dtype=dtype, requires_grad=True)
    if impl.startswith("longctx-"):
        glob = impl == "longctx-global16"
        layer = SelfAttention(D, H, pattern, global_projections=glob, backend=backend)
        if glob:
            gm = torch.zeros(B, n, dtype=torch.bool)
            gm[:, :cfg["global_tokens"]] = True
            return layer.to(dtype), [x], lambda x: layer(x, global_mask=gm)
        return layer.to(dtype), [x], layer
    if impl == "sdpa-dense":
        layer = SelfAttention(D, H, pattern, backend="sdpa")
        return layer.to(dtype), [x], layer
    if impl == "sdpa-masked":
        mask = full_mask(pattern, n)  # (1, 1, n, n) bool, True = may attend

        def core(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        layer = _ProjectedLayer(D, H, core)
        return layer.to(dtype), [x], layer
    if impl == "hf-longformer":
        if n % w:
            raise LongctxError(f"Hugging Face's Longformer needs n to be a multiple of {w}")
        layer = _HFLayer(D, H, w)
        return layer.to(dtype), [x], layer
    if impl in FAMILIES:
        mech = _mechanism(impl, n, cfg)
        layer = _ProjectedLayer(D, H, mech, shared_qk=impl == "longctx-lsh")
        return layer.to(dtype), [x], layer
    if impl == "local-attention":
        from local_attention import LocalAttention
        la = LocalAttention(window_size=w // 2, causal=True, look_backward=1, look_forward=0, autopad=True,
                            use_rotary_pos_emb=False)
        layer = _ProjectedLayer(D, H, lambda q, k, v: la(q, k, v))
        return layer.to(dtype), [x], layer
    raise LongctxError(f"benchmark implementation {impl!r} is unknown; use one of {', '.join(IMPLS)}")


def run_case(spec: dict) -> dict:
    """Measure one case; runs inside the child process."""
    cfg, impl, n = spec["config"], spec["impl"], spec["n"]
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(cfg["seed"])
    reps, warm = cfg["repeats"], cfg["warmup"]
    with common.PeakMemory() as fwd_mem:
        module, inputs, fn = build(impl, n, cfg, dtype)
        with torch.no_grad():
            fwd = common.timed(lambda: fn(*inputs), reps, warm)
    # the training phase's peak counts from the same starting point (module and inputs included)
    base = fwd_mem.base
    reset_ok = common.reset_peak()
    up = torch.randn_like(fn(*inputs).detach())
    params = [] if module is None else list(module.parameters())

    def step():
        for t in inputs + params:
            t.grad = None
        fn(*inputs).backward(up)
    train = common.timed(step, reps, warm)
    train_peak = max(0, common.peak_bytes(reset_ok) - base)
    return {"status": "ok", "fwd_times": fwd, "train_times": train, "fwd_peak_bytes": fwd_mem.bytes,
            "train_peak_bytes": train_peak, "peak_reset": reset_ok}


# -- the driver (in the parent) ----------------------------------------------------------------------------
def _predict(prev: dict | None, impl: str, n: int, cfg: dict):
    """(total seconds, peak bytes) predicted from the same implementation at the previous length."""
    if prev is None or prev.get("status") != "ok":
        return None, None
    pt, pm = SCALING.get(impl, (1, 1))
    r = n / prev["n"]
    per_run = (prev["fwd_s"] + prev["train_s"]) * r ** pt
    return per_run * (cfg["repeats"] + cfg["warmup"] + 1), prev["train_peak_bytes"] * r ** pm


def run(cfg: dict, out_dir: Path, command: str, log=print) -> dict:
    for impl in cfg["implementations"]:
        if impl not in IMPLS:
            raise LongctxError(f"benchmark implementation {impl!r} is unknown; use one of {', '.join(IMPLS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"longctx bench attention -> {out_dir}")
    from longctx.attention import fused  # built here, once, so no case's time or memory includes the build
    if any(i.startswith(("longctx-", "core-")) and not i.endswith(TORCH_KERNEL) for i in cfg["implementations"]):
        log("fused CPU kernel: " + ("ready" if fused.load() else f"unavailable ({fused._state['why_not']})"))
    mm = {}
    for dt in cfg["dtypes"]:
        r = common.run_child(__name__, {"matmul": dt}, timeout=300)
        if r.get("status") != "ok":
            raise LongctxError(f"the matrix-product reference failed for {dt}: {r.get('reason')}")
        mm[dt] = r["gflops"]
        log(f"matrix product reference ({dt}): {mm[dt]:.1f} GFLOP/s")
    cases, last = [], {}
    todo = [(n, dt, impl) for n in sorted(cfg["lengths"]) for dt in cfg["dtypes"] for impl in cfg["implementations"]]
    t_start = time.time()
    for i, (n, dt, impl) in enumerate(todo, 1):
        key = (impl, dt)
        case = {"impl": impl, "n": n, "dtype": dt, "batch": cfg["batch"], "status": "ok", "reason": None}
        prev = last.get(key)
        pred_t, pred_m = _predict(prev, impl, n, cfg)
        reason = common.skip_reason(prev, impl, n, pred_t, pred_m, cfg)
        if reason:
            case.update(status="skipped", reason=reason)
        else:
            # generous: a shared machine can be several times slower than the prediction
            timeout = max(600.0, 5 * (pred_t or cfg["time_cap_s"]))
            r = common.run_child(__name__, {"impl": impl, "n": n, "dtype": dt, "config": cfg}, timeout)
            case.update(r)
        if case["status"] == "ok":
            f_fl, t_fl = useful_flops(impl, n, cfg)
            case["fwd_s"], case["train_s"] = common.median(case["fwd_times"]), common.median(case["train_times"])
            case["useful_flops_fwd"], case["useful_flops_train"] = f_fl, t_fl
            case["fwd_gflops"] = f_fl / case["fwd_s"] / 1e9
            case["train_gflops"] = t_fl / case["train_s"] / 1e9
            case["fwd_fraction_of_matmul"] = case["fwd_gflops"] / mm[dt]
            case["train_fraction_of_matmul"] = case["train_gflops"] / mm[dt]
        cases.append(case)
        if case["status"] != "skipped" or key not in last:
            last[key] = case
        elapsed = time.time() - t_start
        eta = elapsed / i * (len(todo) - i)
        if case["status"] == "ok":
            msg = (f"fwd {common.fmt_s(case['fwd_s'])} s, fwd+bwd {common.fmt_s(case['train_s'])} s, "
                   f"peak {common.fmt_bytes(case['train_peak_bytes'])}, "
                   f"{case['train_fraction_of_matmul']:.0%} of matmul")
        else:
            msg = f"{case['status']}: {case['reason']}"
        log(f"[{i}/{len(todo)}] {impl} n={n} {dt}: {msg}  (elapsed {elapsed:.0f} s, ETA {eta:.0f} s)")
    result = {"schema": common.SCHEMA_VERSION, "benchmark": "attention", "name": cfg["name"],
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
              "config": cfg, "machine": common.machine_info(), "matmul_gflops": mm, "cases": cases}
    result["targets"] = targets(result)
    write_outputs(result, out_dir)
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'time.png'}, {out_dir / 'memory.png'}")
    return result


def _get(result, impl, n, field="train_s", dtype="float32"):
    for c in result["cases"]:
        if c["impl"] == impl and c["n"] == n and c["dtype"] == dtype and c["status"] == "ok":
            return c[field]
    return None


def targets(result: dict) -> list[dict]:
    """The issue's targets, checked on this run's numbers (missing cases give met = None)."""
    g = lambda *a, **k: _get(result, *a, **k)  # noqa: E731
    out = []

    def add(name, value, goal, ok):
        out.append({"target": name, "value": value, "goal": goal, "met": None if value is None else bool(ok(value))})

    for n, speed in ((16384, 5.0), (4096, 3.0)):
        ours, hf = g("longctx-sliding", n), g("hf-longformer", n)
        add(f"sliding fwd+bwd speed-up over HF at {n}", None if None in (ours, hf) else hf / ours, f">= {speed}",
            lambda v, s=speed: v >= s)
    ours, hf = g("longctx-sliding", 16384, "train_peak_bytes"), g("hf-longformer", 16384, "train_peak_bytes")
    add("sliding peak memory / HF at 16384", None if None in (ours, hf) else ours / hf, "<= 0.333", lambda v: v <= 1 / 3)
    ours, sd = g("longctx-sliding", 4096), g("sdpa-dense", 4096)
    add("sliding fwd+bwd speed-up over dense SDPA at 4096", None if None in (ours, sd) else sd / ours, "> 1",
        lambda v: v > 1)
    full, half = g("core-sliding", 4096), g("core-sliding-half", 4096)
    add("attention core speed-up from halving the window (4096)", None if None in (full, half) else full / half,
        ">= 1.7", lambda v: v >= 1.7)
    a, b = g("longctx-sliding", 4096), g("longctx-sliding", 32768)
    add("sliding time(32768) / time(4096)", None if None in (a, b) else b / a, "<= 9", lambda v: v <= 9)
    for impl in FAMILIES:
        a, b = g(impl, 4096), g(impl, 32768)
        add(f"{impl} time(32768) / time(4096)", None if None in (a, b) else b / a, "<= 9", lambda v: v <= 9)
    fused, plain = g("core-sliding", 4096), g("core-sliding-torch", 4096)
    add("fused core fwd+bwd speed-up over the pure-PyTorch kernel (4096)",
        None if None in (fused, plain) else plain / fused, "> 1", lambda v: v > 1)
    fr = g("core-sliding", 4096, "train_fraction_of_matmul")
    add("attention core fwd+bwd useful FLOP/s / matmul (4096)", fr, ">= 0.6", lambda v: v >= 0.6)
    return out


# -- reports -------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Attention benchmark: {result['name']}", "",
             f"`{result['command']}` on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, "
             f"{m['torch_threads']} threads), {result['created']}.", "",
             "Matrix-product reference: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in result["matmul_gflops"].items()),
             "", f"One layer, batch {result['config']['batch']}, hidden {result['config']['hidden']}, "
             f"{result['config']['heads']} heads, attention_window {result['config']['attention_window']} (two-sided). "
             f"Times are medians of {result['config']['repeats']} runs after {result['config']['warmup']} warm-up; "
             "peak = resident memory the case added. `% mm` = useful FLOP/s of fwd+bwd / matrix product.", "",
             "| implementation | n | dtype | fwd s | fwd+bwd s | fwd peak | fwd+bwd peak | useful GFLOP/s | % mm |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in result["cases"]:
        if c["status"] == "ok":
            lines.append(f"| {c['impl']} | {c['n']} | {c['dtype']} | {common.fmt_s(c['fwd_s'])} | "
                         f"{common.fmt_s(c['train_s'])} | {common.fmt_bytes(c['fwd_peak_bytes'])} | "
                         f"{common.fmt_bytes(c['train_peak_bytes'])} | {c['train_gflops']:.1f} | "
                         f"{100 * c['train_fraction_of_matmul']:.0f}% |")
        else:
            lines.append(f"| {c['impl']} | {c['n']} | {c['dtype']} | {c['status']}: {c['reason']} | | | | | |")
    if result.get("targets"):
        lines += ["", "| target | value | goal | met |", "|---|---:|---|---|"]
        for t in result["targets"]:
            v = "-" if t["value"] is None else f"{t['value']:.2f}"
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['target']} | {v} | {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def plots(result: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for field, label, fname in (("train_s", "fwd+bwd time (s)", "time.png"),
                                ("train_peak_bytes", "fwd+bwd peak memory (GB)", "memory.png")):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        series = {}
        for c in result["cases"]:
            if c["status"] == "ok":
                v = c[field] / 2**30 if field.endswith("bytes") else c[field]
                series.setdefault(f"{c['impl']} ({c['dtype']})", []).append((c["n"], max(v, 1e-4)))
        for name, pts in series.items():
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=name, linestyle="--" if "sdpa" in name or "hf" in name or "local" in name else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"{result['name']}: {label} vs length")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        tmp = out_dir / (fname + ".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(out_dir / fname)


def write_outputs(result: dict, out_dir: Path) -> None:
    common.write_atomic(out_dir / "results.json", json.dumps(result, indent=1))
    common.write_atomic(out_dir / "results.md", markdown(result))
    plots(result, out_dir)


# -- child entry point ---------------------------------------------------------------------------------------
def _child(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    if "matmul" in spec:
        out = {"status": "ok", "gflops": common.matmul_gflops(getattr(torch, spec["matmul"]))}
    else:
        out = run_case(spec)
    print(json.dumps(out))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    _child(p.parse_args().child)
    sys.exit(0)
