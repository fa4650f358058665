"""The machine's facts a result records: peak resident memory of this process (the trainer's results and
the benchmarks) and the CPU's model name."""
from __future__ import annotations

import os
import platform
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


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict:
    """What a result records about the machine it ran on."""
    return {"platform": platform.platform(), "cpu": cpu_name(), "cpus": os.cpu_count()}
