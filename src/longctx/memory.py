"""Peak resident memory of this process: one helper for the trainer's results and the benchmarks."""
from __future__ import annotations

import os
import resource
import sys


def proc_status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status ("VmHWM", "VmSize", ...) in bytes, or None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The peak resident memory of this process (Linux ``VmHWM``: since it started, or since the last
    ``/proc/self/clear_refs`` reset). Not ``ru_maxrss`` where ``VmHWM`` exists: Linux carries a parent's
    resident size over fork and exec into the child's ``ru_maxrss``, so a process started from a large
    one (a test run, a comparison's driver) would report its parent's size instead of its own."""
    hwm = proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere



THP_SWITCH = "THP_MEM_ALLOC_ENABLE"  # PyTorch's own: CPU tensors of 2 MiB and more advised as huge pages
_THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


def use_huge_pages() -> str:
    """Back this process's large CPU tensors with transparent huge pages (2 MiB) where the kernel offers
    them, through PyTorch's ``THP_MEM_ALLOC_ENABLE``. Call it at the start of a process, before its first
    tensor of 2 MiB or more: PyTorch reads the switch once, at that allocation.

    Why: glibc maps every block over its mmap threshold afresh and unmaps it on ``free``, so a training step
    at long lengths takes a page fault per 4 KiB of every sequence-sized tensor it allocates (about a
    million per LSH or BigBird step at 32,768 tokens: a third of the step). With huge pages the faults are
    512 times fewer; the step is 25-40% faster at 32,768 tokens, the same at 4,096, and the peak resident
    memory the same (docs/benchmarks.md, "Page faults"). Keeping freed memory instead (``mallopt``: no
    mmap, no trim) was as fast but doubled the peak resident memory: rejected.

    Returns what is in force, for results and logs. A ``THP_MEM_ALLOC_ENABLE`` already in the environment
    (``0`` turns huge pages off) is left as it is."""
    if THP_SWITCH in os.environ:  # the user's, or a longctx parent's (children inherit it)
        return f"{THP_SWITCH}={os.environ[THP_SWITCH]} (from the environment)"
    try:
        with open(_THP_SYSFS) as f:
            mode = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "no transparent huge pages (this kernel has none)"
    if mode == "never":
        return "no transparent huge pages (the kernel's setting is 'never')"
    os.environ[THP_SWITCH] = "1"
    return f"transparent huge pages for tensors of 2 MiB and more ({THP_SWITCH}=1; kernel: {mode})"
