"""Peak resident memory of this process: one helper for the trainer's results and the benchmarks."""
from __future__ import annotations

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
