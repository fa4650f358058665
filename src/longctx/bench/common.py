"""What both benchmarks share: child processes, timing, peak memory, the matmul reference, reports.

Every measured case runs in its own Python process, so the peak memory of one case cannot hide in, or
add to, another's. The child resets the kernel's resident-memory high-water mark (``/proc/self/clear_refs``)
right before the case and reads it after (``VmHWM``), minus the resident memory at the start: the
memory the case itself added. Where the reset is not allowed it falls back to ``ru_maxrss``.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from longctx import io
from longctx.errors import LongctxError

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


def peak_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.bytes``: the resident memory the block added at its peak."""

    def __enter__(self):
        self.reset_ok = reset_peak()
        self.base = rss_bytes()
        return self

    def __exit__(self, *exc):
        self.bytes = max(0, peak_bytes(self.reset_ok) - self.base)
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
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_bytes": mem, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "bf16_matmul": _bf16_ok()}


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


def write_atomic(path: Path, text: str | bytes) -> None:
    (io.write_bytes if isinstance(text, bytes) else io.write_text)(path, text)


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
