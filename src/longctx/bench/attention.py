"""`longctx bench attention`: one self-attention layer, every implementation, the same shapes.

Each case is one implementation at one length and dtype, run in its own process (see ``common``):
forward (inference, no autograd graph) and forward+backward (a training step of the layer: output
projection included, gradient of a random upstream) wall times, median of ``repeats`` runs after
``warmup``, and the peak resident memory each phase added. Useful FLOPs are the projections plus the
attention core's own count, asked of its registry mechanism (``Mechanism.flops``: for a mask pattern,
4 * attended pairs * head_dim per head, QK^T and PV); three times the forward for forward+backward;
recomputation is not useful work. Peers are counted as the mechanism they compute (HF's Longformer as
the sliding window, local-attention as LeX's blockwise causal with block window/2).

Implementations ("impl" in the results):
  longctx-sliding          SelfAttention, sliding window (one-sided window/2), blocked kernel
  longctx-sliding-half     the same with half the window
  longctx-dilated          sliding window, dilation 2 on the last 2 heads (Longformer's upper layers)
  longctx-blocks           disjoint blocks of size `window` (Xiong et al.)
  longctx-global16         sliding window + the first 16 tokens global, separate global projections
  longctx-blockwise-causal LeX blockwise causal, block `window`
  longctx-causal           causal sliding window of window/2 (the local-attention comparison)
  core-sliding, core-sliding-half   the attention core alone (q, k, v given): kernel throughput
  core-sliding-gqa         the core with grouped-query heads: k, v with heads / kv_groups heads, read in
                           place by the fused kernel (not in the default list)
  core-sliding-gqa-repeat  the same k, v repeated to one head per query head before the call, as Hugging
                           Face's eager and SDPA paths do (not in the default list)
  ...-torch                the same case on the pure-PyTorch blocked kernel (backend "blocked-torch"):
                           without the suffix, backend "blocked" runs the fused C++ kernel where it builds
  sdpa-dense               the same layer with full attention through PyTorch SDPA, no mask
  sdpa-masked              SDPA with the sliding pattern's n x n boolean mask
  hf-longformer            transformers' LongformerSelfAttention (attention_window = window) + output proj.
  local-attention          lucidrains' local-attention (causal, window_size window/2, look_backward 1)
  longctx-NAME             any other registered mechanism NAME (attention/mechanism.py: MECHANISMS) with
                           its ``bench`` example settings (``Mechanism.examples``), in the same projected
                           layer; in the default list:
  longctx-linformer        the Linformer mechanism (k = 256, E/F per layer)
  longctx-performer        Performer FAVOR+ (256 orthogonal random features)
  longctx-nystrom          Nystromformer (64 landmarks, conv skip 33)
  longctx-lsh              Reformer LSH attention (chunk 64, 64 buckets, 2 hashes; shared QK projection)
  longctx-bigbird          BigBird ITC (blocks of 64, 3 random blocks, the first and last block global) on
                           its block-layout kernel (attention/bigbird.py: layout_attention)
The acceptance targets are the config's ``targets:`` section (see benchmarks/attention.yaml, common.py).
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import LongformerConfig
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from longctx import plots as figures
from longctx.attention import SelfAttention, attention, fused
from longctx.attention.functional import repeat_kv
from longctx.attention.lsh import LSH
from longctx.attention.mechanism import MECHANISMS, LayerContext, build as build_mechanism
from longctx.attention.patterns import full_mask
from longctx.bench import common
from longctx.errors import LongctxError
from longctx.memory import peak_rss_bytes

DEFAULTS = {
    "name": "attention",
    "hidden": 768,
    "heads": 12,
    "attention_window": 512,  # two-sided, named as Hugging Face's; longctx's one-sided window is half
    "global_tokens": 16,
    "kv_groups": 4,  # query heads per key-value head in the grouped-query cases (Mistral 7B: 32 / 8)
    "batch": 1,
    "lengths": [1024, 2048, 4096, 8192, 16384, 32768, 65536],
    "implementations": ["longctx-sliding", "longctx-sliding-half", "longctx-dilated", "longctx-blocks",
                        "longctx-global16", "longctx-blockwise-causal", "longctx-causal", "core-sliding",
                        "core-sliding-half", "sdpa-dense", "sdpa-masked", "hf-longformer", "local-attention",
                        "longctx-linformer", "longctx-performer", "longctx-nystrom", "longctx-lsh",
                        "longctx-bigbird", "longctx-sliding-torch", "core-sliding-torch", "core-sliding-half-torch"],
    "dtypes": ["float32"],
    "repeats": 5,
    "warmup": 1,
    "time_cap_s": 300.0,  # skip a case whose predicted total run time exceeds this
    "memory_cap_gb": 12.0,  # skip a case whose predicted peak exceeds this
    "seed": 0,
    "targets": [],  # acceptance targets (common.check_targets); the YAML configs in benchmarks/ carry them
}

# time and memory grow as n^p: used to predict the next length from the last measured one
SCALING = {"sdpa-dense": (2, 1), "sdpa-masked": (2, 2)}
IMPLS = DEFAULTS["implementations"]
GQA_CASES = ["core-sliding-gqa", "core-sliding-gqa-repeat"]  # runnable by name, not in the default list
TORCH_KERNEL = "-torch"  # suffix: the case on the pure-PyTorch blocked kernel, beside the fused one


def _base(impl: str) -> str:
    return impl[:-len(TORCH_KERNEL)] if impl.endswith(TORCH_KERNEL) else impl

# the cases whose attention follows from ``attention_window`` (the mask family and its peers)
WINDOW_CASES = ("longctx-sliding", "longctx-sliding-half", "longctx-dilated", "longctx-blocks", "longctx-global16",
                "longctx-blockwise-causal", "longctx-causal", "core-sliding", "core-sliding-half", "sdpa-dense",
                "sdpa-masked", "hf-longformer", "local-attention", *GQA_CASES)


def families() -> dict[str, tuple[str, dict]]:
    """``longctx-NAME`` -> (NAME, its ``bench`` example) for every registered mechanism whose name no
    window case takes (longctx-sliding and longctx-blocks stay the window's): the approximate families,
    BigBird, and any mechanism registered later, read from the registry at each call."""
    return {f"longctx-{name}": (name, cls.example("bench")) for name, cls in sorted(MECHANISMS.items())
            if f"longctx-{name}" not in WINDOW_CASES}


def impls() -> list[str]:
    """Every implementation a run may name: the listed ones and a ``longctx-NAME`` per mechanism."""
    return IMPLS + GQA_CASES + [i for i in families() if i not in IMPLS]


def _attention_spec(impl: str, cfg: dict) -> tuple[str, dict, bool]:
    """The registry mechanism a case computes: (type, its config keys, causal). ``attention_window`` is
    two-sided, the mechanisms' ``window`` one-sided (half of it)."""
    impl, w, H = _base(impl), cfg["attention_window"], cfg["heads"]
    fams = families()
    if impl in fams:
        return (*fams[impl], False)
    if impl in ("longctx-sliding", "core-sliding", "longctx-global16", "sdpa-masked", "hf-longformer", *GQA_CASES):
        return "sliding", {"window": w // 2}, False
    if impl in ("longctx-sliding-half", "core-sliding-half"):
        return "sliding", {"window": w // 4}, False
    if impl == "longctx-dilated":
        return "sliding", {"window": w // 2, "dilation": (1,) * (H - 2) + (2, 2)}, False
    if impl == "longctx-blocks":
        return "blocks", {"block": w}, False
    if impl == "longctx-blockwise-causal":
        return "blockwise_causal", {"block": w}, True
    if impl == "longctx-causal":
        return "sliding", {"window": w // 2}, True
    if impl == "local-attention":
        # buckets of w/2: a query sees its own bucket causally and the whole previous one, which is
        # exactly LeX's blockwise causal attention with block w/2
        return "blockwise_causal", {"block": w // 2}, True
    return "full", {}, False  # sdpa-dense


def _mechanism(impl: str, n: int, cfg: dict):
    """The case's attention as a registry mechanism (the families run it; every case counts its FLOPs)."""
    name, fields, causal = _attention_spec(impl, cfg)
    ctx = LayerContext(num_heads=cfg["heads"], head_dim=cfg["hidden"] // cfg["heads"], max_len=n, causal=causal,
                       seed=cfg["seed"])
    return build_mechanism(name, fields, ctx, where=f"benchmark implementation {impl!r}")


def useful_flops(impl: str, n: int, cfg: dict) -> tuple[float, float]:
    """(forward, forward+backward) useful FLOPs of the case: the mechanism's own count plus projections."""
    B, D = cfg["batch"], cfg["hidden"]
    num_global = min(cfg["global_tokens"], n) if _base(impl) == "longctx-global16" else 0
    mech = _mechanism(impl, n, cfg)
    attn = mech.flops(n, num_global) * B
    n_proj = 0 if impl.startswith("core-") else (7 if impl == "longctx-global16" else 3 if _shared_qk(mech) else 4)
    proj = 2.0 * B * n * D * D * n_proj
    return attn + proj, 3 * (attn + proj)


def _shared_qk(mech) -> bool:
    """Reformer's LSH attention takes k = q: its layer has one query-key projection."""
    return isinstance(mech, LSH)


# -- building one case (in the child) -----------------------------------------------------------------------
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
    B, D, H, w = cfg["batch"], cfg["hidden"], cfg["heads"], cfg["attention_window"]
    mech = _mechanism(impl, n, cfg)
    pattern = getattr(mech, "pattern", None)  # the mask family's predicate; None for the approximate families
    backend = "blocked-torch" if impl.endswith(TORCH_KERNEL) else "blocked"
    impl = _base(impl)
    if impl.startswith("core-"):
        groups = cfg["kv_groups"] if impl in GQA_CASES else 1
        if H % groups:
            raise LongctxError(f"kv_groups {groups} does not divide the {H} heads")
        qkv = [torch.randn(B, H // (groups if i else 1), n, D // H, dtype=dtype, requires_grad=True) for i in range(3)]
        if impl == "core-sliding-gqa-repeat":
            return None, qkv, lambda q, k, v: attention(q, repeat_kv(k, groups), repeat_kv(v, groups), pattern,
                                                        backend=backend)
        return None, qkv, lambda q, k, v: attention(q, k, v, pattern, backend=backend)
    x = torch.randn(B, n, D, dtype=dtype, requires_grad=True)
    if impl in families():  # before the mask family's "longctx-" cases: these names start so too
        layer = _ProjectedLayer(D, H, mech, shared_qk=_shared_qk(mech))
        return layer.to(dtype), [x], layer
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
    if impl == "local-attention":
        from local_attention import LocalAttention  # here: an optional dependency (pip install longctx[bench])
        la = LocalAttention(window_size=w // 2, causal=True, look_backward=1, look_forward=0, autopad=True,
                            use_rotary_pos_emb=False)
        layer = _ProjectedLayer(D, H, lambda q, k, v: la(q, k, v))
        return layer.to(dtype), [x], layer
    raise LongctxError(f"benchmark implementation {impl!r} is unknown; use one of {', '.join(impls())}")


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
    train_peak = max(0, peak_rss_bytes() - base)
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
    known = impls()
    for impl in cfg["implementations"]:
        if impl not in known:
            raise LongctxError(f"benchmark implementation {impl!r} is unknown; use one of {', '.join(known)}")
    common.check_targets(cfg["targets"], "impl", known)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"longctx bench attention -> {out_dir}")
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
    with common.progress(len(todo), "attention") as bar:
        for i, (n, dt, impl) in enumerate(todo, 1):
            case = _case(impl, n, dt, last.get((impl, dt)), cfg, mm)
            cases.append(case)
            if case["status"] != "skipped" or (impl, dt) not in last:
                last[(impl, dt)] = case
            bar.write(f"[{i}/{len(todo)}] {impl} n={n} {dt}: {_summary(case)}")
            bar.update(1)
    result = {"schema": common.SCHEMA_VERSION, "benchmark": "attention", "name": cfg["name"],
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
              "config": cfg, "machine": common.machine_info(), "matmul_gflops": mm, "cases": cases}
    result["targets"] = common.evaluate_targets(result, "impl")
    write_outputs(result, out_dir)
    log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'time.png'}, {out_dir / 'memory.png'}")
    return result


def _case(impl: str, n: int, dt: str, prev: dict | None, cfg: dict, mm: dict) -> dict:
    """Run one case in its own process (or say why not) and derive its rates."""
    case = {"impl": impl, "n": n, "dtype": dt, "batch": cfg["batch"], "status": "ok", "reason": None}
    pred_t, pred_m = _predict(prev, impl, n, cfg)
    reason = common.skip_reason(prev, impl, n, pred_t, pred_m, cfg)
    if reason:
        return {**case, "status": "skipped", "reason": reason}
    # generous: a shared machine can be several times slower than the prediction
    timeout = max(600.0, 5 * (pred_t or cfg["time_cap_s"]))
    case.update(common.run_child(__name__, {"impl": impl, "n": n, "dtype": dt, "config": cfg}, timeout))
    if case["status"] == "ok":
        f_fl, t_fl = useful_flops(impl, n, cfg)
        case["fwd_s"], case["train_s"] = common.median(case["fwd_times"]), common.median(case["train_times"])
        case["useful_flops_fwd"], case["useful_flops_train"] = f_fl, t_fl
        case["fwd_gflops"] = f_fl / case["fwd_s"] / 1e9
        case["train_gflops"] = t_fl / case["train_s"] / 1e9
        case["fwd_fraction_of_matmul"] = case["fwd_gflops"] / mm[dt]
        case["train_fraction_of_matmul"] = case["train_gflops"] / mm[dt]
    return case


def _summary(case: dict) -> str:
    if case["status"] != "ok":
        return f"{case['status']}: {case['reason']}"
    return (f"fwd {common.fmt_s(case['fwd_s'])} s, fwd+bwd {common.fmt_s(case['train_s'])} s, "
            f"peak {common.fmt_bytes(case['train_peak_bytes'])}, {case['train_fraction_of_matmul']:.0%} of matmul")


# -- reports -------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Attention benchmark: {result['name']}", "",
             f"`{result['command']}` on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, "
             f"{m['torch_threads']} threads), {result['created']}.", "",
             "Matrix-product reference: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in result["matmul_gflops"].items())
             + (f"; the fused kernel's bf16 products: {m['fused_bf16_products']}"
                if "bfloat16" in result["matmul_gflops"] and m.get("fused_bf16_products") else ""),
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
    lines += common.targets_markdown(result["targets"])
    return "\n".join(lines) + "\n"


def plots(result: dict, out_dir: Path) -> None:
    for field, label, fname in (("train_s", "fwd+bwd time (s)", "time.png"),
                                ("train_peak_bytes", "fwd+bwd peak memory (GB)", "memory.png")):
        points = {}
        for c in result["cases"]:
            if c["status"] == "ok":
                v = c[field] / 2**30 if field.endswith("bytes") else c[field]
                points.setdefault(f"{c['impl']} ({c['dtype']})", []).append((c["n"], max(v, 1e-4)))
        series = []
        for name, pts in points.items():
            xs, ys = zip(*sorted(pts))
            peer = "sdpa" in name or "hf" in name or "local" in name  # the peers dashed
            series.append({"x": xs, "y": ys, "label": name, "style": "o--" if peer else "o-"})
        figures.line_figure(out_dir / fname, series, "sequence length (tokens)", label,
                            title=f"{result['name']}: {label} vs length", log_x=2, log_y=True, figsize=(8, 5.5),
                            legend_size=7, dpi=110)


def write_outputs(result: dict, out_dir: Path) -> None:
    common.write_reports(result, out_dir, markdown(result))
    plots(result, out_dir)


if __name__ == "__main__":
    common.child_main(run_case)
