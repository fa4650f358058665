"""What both benchmarks share: child processes, timing, peak memory, the matmul reference, reports.

Every measured case runs in its own Python process, so the peak memory of one case cannot hide in, or
add to, another's. The child resets the kernel's resident-memory high-water mark (``/proc/self/clear_refs``)
right before the case and reads it after (``VmHWM``), minus the resident memory at the start: the
memory the case itself added. Where the reset is not allowed the peak counts from the child's start.
"""
from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch

from longctx import cpu_cache, io
from longctx.errors import LongctxError
from longctx.memory import cpu_name, peak_rss_bytes
from longctx.progress import Progress

SCHEMA_VERSION = 1


# -- inside a child --------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the resident-memory high-water mark; False where the kernel does not let us."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False




class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.bytes``: the resident memory the block added at its peak."""

    def __enter__(self):
        self.reset_ok = reset_peak()
        self.base = rss_bytes()
        return self

    def __exit__(self, *exc):
        self.bytes = max(0, peak_rss_bytes() - self.base)
        return False


def timed(fn, repeats: int, warmup: int) -> list[float]:
    """Wall times of ``repeats`` calls of fn after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 7) -> float:
    """Throughput of a square matrix product on this machine now: the 100% mark for FLOP fractions."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    c = torch.empty(size, size, dtype=dtype)
    times = timed(lambda: torch.mm(a, b, out=c), repeats, 2)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def child_main(run_case) -> None:
    """A child's entry point (``python -m module --child SPEC``): the matrix-product reference or
    ``run_case(spec)``; prints the JSON. Every case, longctx's and the peers' alike, runs under the
    allocator the main commands use: longctx's caching CPU allocator (``longctx.cpu_cache``; its cap, or
    "off" with ``LONGCTX_CPU_CACHE_MB=0``, is recorded as ``cpu_cache``) over PyTorch's defaults (a
    ``THP_MEM_ALLOC_ENABLE`` in the environment is recorded too: it moves times by -55% to +40% depending on
    the case, docs/benchmarks.md)."""

    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    spec = json.loads(Path(p.parse_args().child).read_text())
    cache = cpu_cache.setup()
    out = ({"status": "ok", "gflops": matmul_gflops(getattr(torch, spec["matmul"]))} if "matmul" in spec
           else run_case(spec))
    print(json.dumps({**out, "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"), "cpu_cache": cache}))


# -- in the parent ---------------------------------------------------------------------------------------
def run_child(module: str, spec: dict, timeout: float) -> dict:
    """Run ``python -m module --child SPEC`` and return the JSON object it prints last."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        path = f.name
    try:
        res = subprocess.run([sys.executable, "-m", module, "--child", path], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"ran past {timeout:.0f} s"}
    finally:
        os.unlink(path)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "failed", "reason": f"exit {res.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def machine_info() -> dict:
    cpu = cpu_name()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_bytes": mem, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "bf16_matmul": _bf16_ok(), "fused_bf16_products": _fused_bf16()}


def _fused_bf16() -> str:
    """The path of the fused attention kernel's bf16 products (longctx.attention.fused.bf16_products)."""
    try:
        from longctx.attention import fused
        return fused.bf16_products()
    except Exception as e:  # the machine section must not fail a finished run
        return f"unknown ({type(e).__name__})"


def _bf16_ok() -> bool:
    try:
        torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
        return True
    except RuntimeError:
        return False


def load_config(path: str | None, default: dict, name: str) -> dict:
    """The benchmark's YAML configuration merged over its defaults; unknown keys are an error."""
    cfg = dict(default)
    if path:
        data = io.load_yaml(path, "benchmark config", f"; give a YAML file such as benchmarks/{name}.yaml")
        unknown = sorted(set(data) - set(default))
        if "window" in unknown and "attention_window" in default:  # one meaning of window: one-sided
            raise LongctxError(f"benchmark config {path}: 'window' is now 'attention_window' (two-sided, as Hugging "
                               f"Face's; longctx's window is one-sided, half of it); rename the key")
        if unknown:
            raise LongctxError(f"benchmark config {path} has unknown keys {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(default))}")
        cfg.update(data)
    return cfg


def write_reports(result: dict, out_dir: Path, markdown: str) -> None:
    io.write_json(out_dir / "results.json", result)
    io.write_text(out_dir / "results.md", markdown)


def progress(total: int, kind: str):
    """The benchmark's progress over its cases (longctx.progress: a bar on a terminal, plain lines with
    rate and ETA otherwise); each case's result is a ``.write`` line, so it stays on screen."""
    return Progress(total, f"bench {kind}", "cases", interval=60.0)


# -- targets: the acceptance thresholds, read from the benchmark's YAML ------------------------------------
# One target compares numbers of this run:
#   {target: "sliding speed-up over HF at 4096", field: train_s, of: hf-longformer, over: longctx-sliding,
#    n: 4096, goal: ">= 3"}
# ``of`` / ``over`` select a case: a name (the benchmark's implementation or model), or a mapping of case
# keys (impl, model, n, dtype, mode); ``n`` at the top applies to both. The value is ``field`` of ``of``, divided
# by ``over``'s where given (``compare: relative_difference``: |of / over - 1|), in ``unit`` (GiB) for
# bytes. ``goal``: an operator and a number or fraction; ``goal_times_matmul: [bfloat16, float32]``
# multiplies the number by this machine's matmul throughput ratio. A case not run gives met = None.
TARGET_KEYS = ("target", "field", "of", "over", "n", "unit", "compare", "goal", "goal_times_matmul")
SELECTOR_KEYS = ("impl", "model", "n", "dtype", "mode")
GOAL_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
UNITS = {"GiB": 2**-30, "MiB": 2**-20}
COMPARES = ("ratio", "relative_difference")


def check_targets(targets, name_key: str, names) -> None:
    """Refuse a malformed ``targets:`` section (one sentence) before anything runs."""
    if not isinstance(targets, list):
        raise LongctxError("benchmark config: 'targets' must be a list of targets (see benchmarks/attention.yaml)")
    for t in targets:
        label = t.get("target", t) if isinstance(t, dict) else t
        if not isinstance(t, dict) or not {"target", "field", "of", "goal"} <= set(t):
            raise LongctxError(f"benchmark target {label!r} needs the keys target, field, of and goal")
        unknown = sorted(set(t) - set(TARGET_KEYS))
        if unknown:
            raise LongctxError(f"benchmark target {label!r} has unknown keys {', '.join(unknown)}; "
                               f"known: {', '.join(TARGET_KEYS)}")
        _goal(t["goal"], label)
        if t.get("unit") not in (None, *UNITS) or t.get("compare", "ratio") not in COMPARES:
            raise LongctxError(f"benchmark target {label!r}: unit must be one of {', '.join(UNITS)} and compare "
                               f"one of {', '.join(COMPARES)}")
        for role in ("of", "over"):
            if role in t:
                for k, v in _selector(t, role, name_key).items():
                    if k not in SELECTOR_KEYS:
                        raise LongctxError(f"benchmark target {label!r}: {role} has unknown key {k!r}; "
                                           f"known: {', '.join(SELECTOR_KEYS)}")
                    if k == name_key and v not in names:
                        raise LongctxError(f"benchmark target {label!r}: {name_key} {v!r} is unknown; "
                                           f"use one of {', '.join(names)}")


def _goal(goal, label) -> tuple[str, float]:
    """("<=", 0.25) from "<= 1/4"."""
    op, _, num = str(goal).strip().partition(" ")
    try:
        if op not in GOAL_OPS:
            raise ValueError(op)
        return op, float(Fraction(num.strip()))
    except (ValueError, ZeroDivisionError):
        raise LongctxError(f"benchmark target {label!r}: goal {goal!r} must be an operator "
                           f"({', '.join(GOAL_OPS)}) and a number, such as \">= 3\" or \"<= 1/3\"") from None


def _selector(t: dict, role: str, name_key: str) -> dict:
    sel = t[role] if isinstance(t[role], dict) else {name_key: t[role]}
    return {**({"n": t["n"]} if "n" in t else {}), **sel}


def case_field(result: dict, sel: dict, field: str):
    """``field`` of the first case that ran and matches every key of ``sel``, or None."""
    for c in result["cases"]:
        if c["status"] == "ok" and all(c.get(k) == v for k, v in sel.items()) and c.get(field) is not None:
            return c[field]
    return None


def evaluate_target(result: dict, t: dict, name_key: str) -> tuple[dict, float | None, float | None]:
    """(the report's row {target, value, goal, met}, the ``of`` number, the ``over`` number)."""
    op, bound = _goal(t["goal"], t["target"])
    goal = t["goal"]
    if "goal_times_matmul" in t:
        num, den = t["goal_times_matmul"]
        mm = result.get("matmul_gflops", {})
        if num in mm and den in mm:
            bound *= mm[num] / mm[den]
            goal = f"{op} {bound:.2f} ({t['goal'].split(' ', 1)[1]} of the {num}/{den} matmul ratio)"
        else:
            bound = None
    a = case_field(result, _selector(t, "of", name_key), t["field"])
    b = case_field(result, _selector(t, "over", name_key), t["field"]) if "over" in t else 1.0
    value = None
    if a is not None and b:
        value = a / b * UNITS.get(t.get("unit"), 1.0)
        if t.get("compare") == "relative_difference":
            value = abs(value - 1)
    met = None if value is None or bound is None else bool(GOAL_OPS[op](value, bound))
    return {"target": t["target"], "value": value, "goal": goal, "met": met}, a, (b if "over" in t else None)


def evaluate_targets(result: dict, name_key: str) -> list[dict]:
    return [evaluate_target(result, t, name_key)[0] for t in result["config"].get("targets", [])]


def targets_markdown(targets: list[dict]) -> list[str]:
    """The targets table (nothing when the config has no targets)."""
    if not targets:
        return []
    lines = ["", "| target | value | goal | met |", "|---|---:|---|---|"]
    for t in targets:
        v = "-" if t["value"] is None else f"{t['value']:.2f}"
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {v} | {t['goal']} | {met} |")
    return lines


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GB" if b >= 2**30 else f"{b / 2**20:.0f} MB"


def fmt_s(t) -> str:
    if t is None:
        return "-"
    return f"{t:.3f}" if t < 10 else f"{t:.1f}"


def median(xs):
    return statistics.median(xs) if xs else None


def skip_reason(prev: dict | None, name: str, n: int, pred_t, pred_m, cfg: dict) -> str | None:
    """Why a case is not run (a failure or skip at a shorter length, HF's length rule, a predicted time or
    memory over the caps), or None to run it."""
    if prev is not None and prev["status"] != "ok":
        return f"{prev['status']} at a shorter length"
    if name == "hf-longformer" and n % cfg["attention_window"]:
        return f"n is not a multiple of attention_window {cfg['attention_window']}"
    if pred_t is not None and pred_t > cfg["time_cap_s"]:
        return f"predicted {pred_t:.0f} s > time cap {cfg['time_cap_s']:.0f} s"
    if pred_m is not None and pred_m > cfg["memory_cap_gb"] * 2**30:
        return f"predicted {pred_m / 2**30:.1f} GB > memory cap {cfg['memory_cap_gb']:.0f} GB"
    return None
