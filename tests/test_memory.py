"""The memory policy (longctx.memory.use_huge_pages): large tensors on transparent huge pages.

Oracle: the kernel's count of minor page faults (``ru_minflt``) around allocating and touching a 64 MiB
tensor, and the huge pages /proc/self/smaps reports. Under the defaults glibc maps the block afresh each
time, one fault per 4 KiB page (16,384); on 2 MiB pages, 32.
"""
import json
import os
import subprocess
import sys

import pytest

from longctx.memory import THP_SWITCH, use_huge_pages

CHILD = """
import json, resource, sys
from longctx.memory import use_huge_pages
policy = use_huge_pages()   # first, as every longctx process does
import torch
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20)  # 64 MiB
    t.fill_(1.0)                  # touch every page
    if len(faults) == 2:
        huge = sum(int(l.split()[1]) for l in open("/proc/self/smaps") if l.startswith("AnonHugePages")) * 1024
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"policy": policy, "faults": faults, "huge_bytes": huge}))
"""


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return None


needs_thp = pytest.mark.skipif(_thp_mode() in (None, "never"), reason="this kernel offers no transparent huge pages")


def _child(env_switch: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != THP_SWITCH}
    if env_switch is not None:
        env[THP_SWITCH] = env_switch
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_thp
def test_large_tensors_take_512_times_fewer_page_faults():
    on, off = _child(None), _child("0")
    assert on["policy"].startswith("transparent huge pages") and THP_SWITCH + "=1" in on["policy"]
    assert off["policy"] == f"{THP_SWITCH}=0 (from the environment)"  # the user's choice stands
    pages = 16 * 2**20 * 4 // os.sysconf("SC_PAGE_SIZE")
    assert min(off["faults"]) > pages // 2, off  # a fault per 4 KiB page, every time
    assert off["huge_bytes"] < 16 * 2**20 * 4 // 2, off
    assert max(on["faults"]) < pages // 20, on  # a fault per 2 MiB page (and a few for the rest)
    assert on["huge_bytes"] >= 16 * 2**20 * 4 // 2, on


def test_policy_reports_what_is_in_force(monkeypatch):
    monkeypatch.setenv(THP_SWITCH, "0")
    assert use_huge_pages() == f"{THP_SWITCH}=0 (from the environment)"
    assert os.environ[THP_SWITCH] == "0"


def test_benchmark_cases_record_the_policy():
    from longctx.bench import common
    r = common.run_child("longctx.bench.attention", {"matmul": "float32"}, timeout=120)
    assert r["status"] == "ok" and r["gflops"] > 0
    assert THP_SWITCH in r["memory_pages"] or r["memory_pages"].startswith("no transparent huge pages")
