"""A caching CPU allocator for PyTorch: freed blocks of 1 MB and more are kept and handed out again.

On CPU, PyTorch allocates through glibc, which maps every block above its mmap threshold (at most 32 MB)
fresh from the kernel and unmaps it when freed; the first touch of each 4 KB page then faults and zeroes
it. Long sequences make most activations such blocks (at 16,384 tokens and hidden size 768 each is 50 MB),
so the faults grow faster than the work: they were a fifth of the fused attention core's time at 16,384
tokens, and why the efficient-attention families' time(32k)/time(4k) moved between 7 and 12 from run to
run. The cache (``csrc/cpu_cache.cpp``) keeps freed blocks by size class (64 KB steps) and serves the next
request of that class from them, as PyTorch's CUDA caching allocator does on the GPU; a training step asks
for the same sizes every step, so after the first step nothing faults. Measured (docs/benchmarks.md): the
sliding-window layer fwd+bwd at 16,384 tokens 10% faster, LSH and Performer layers at 32,768 30% and 23%
faster, with the same or a lower peak resident memory (glibc's heap fragmentation goes too).

The bytes held free are capped (``LONGCTX_CPU_CACHE_MB``, default a quarter of the machine's memory): a
freed block that would take the cache over the cap is returned to the system at once, so the cache can
add at most the cap to a process's footprint (workloads whose tensor sizes change every step, such as
unpacked batches of varying length, should set a small cap or 0).

``longctx pretrain``/``finetune``/``compare`` and every benchmark process turn it on (``LONGCTX_CPU_CACHE_MB=0``
turns it off; the benchmarks record the setting); in your own training loop call ``longctx.cpu_cache.enable()``.
It lives in longctx's C++ extension (built on first use, like the fused attention kernel); without a
compiler PyTorch's allocator stays and this says so once.
"""
from __future__ import annotations

import logging
import os

import torch

from longctx.attention import fused, dispatch
from longctx.errors import LongctxError

log = logging.getLogger(__name__)

__all__ = ["default_cap", "disable", "enable", "setup", "stats"]

STATS = ("cap_bytes", "cached_bytes", "peak_cached_bytes", "in_use_bytes", "peak_in_use_bytes", "hits", "misses",
         "enabled")


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def default_cap() -> int:
    """Bytes the cache may hold free: ``LONGCTX_CPU_CACHE_MB`` (0 turns the cache off), else a quarter of
    the machine's memory."""
    raw = os.environ.get("LONGCTX_CPU_CACHE_MB")
    if raw is None or raw.strip() == "":
        return _mem_total() // 4
    try:
        mb = int(raw)
    except ValueError:
        raise LongctxError(f"LONGCTX_CPU_CACHE_MB must be a whole number of megabytes (0 turns the cache off), "
                           f"got {raw!r}") from None
    if mb < 0:
        raise LongctxError(f"LONGCTX_CPU_CACHE_MB must be 0 or more, got {mb}")
    return mb << 20


def _ops(build: bool):
    return torch.ops.longctx_cpu_cache if fused.load(build=build) else None


def enable(cap_bytes: int | None = None, *, build: bool = True) -> bool:
    """Route PyTorch's CPU allocations through the cache, holding at most ``cap_bytes`` free (default
    ``default_cap()``; 0 turns it off). False where the extension cannot be built (logged once)."""
    cap = default_cap() if cap_bytes is None else int(cap_bytes)
    if cap < 0:
        raise LongctxError(f"the CPU cache's cap must be 0 or more bytes, got {cap}")
    ops = _ops(build)
    if ops is None:
        return False
    ops.enable(cap)
    return cap > 0


def disable() -> None:
    """Back to PyTorch's allocator; the blocks held free are returned to the system (blocks in use come
    back through the cache's deleter whenever they are freed)."""
    ops = _ops(build=False)
    if ops is not None:
        ops.enable(0)


def stats() -> dict[str, int]:
    """The cache's counters: cap, bytes held free (now and at peak), bytes handed out (now and at peak),
    hits, misses, and enabled (1 or 0). All zero where the extension is not loaded."""
    ops = _ops(build=False)
    return dict(zip(STATS, ops.stats() if ops is not None else [0] * len(STATS)))


def setup() -> str:
    """What the main commands and the benchmark processes call: the cache on with the default cap, unless
    ``LONGCTX_CPU_CACHE_MB=0``. The test suite sets that unless it is already set (tests/conftest.py: the
    suite's process runs many models of many sizes; tests/test_cpu_cache.py checks the cache in processes
    of its own). Returns the setting, for the run's records: "off" or the cap in MB."""

    cap = default_cap()
    if cap == 0:
        return "off"
    return f"{cap >> 20} MB" if enable(cap, build=dispatch.fused_builds_on_demand()) else "off"
