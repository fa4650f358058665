import os

# Settings of the whole test session, made before longctx is imported and inherited by every process a
# test starts (a variable the shell already sets wins):
# - LONGCTX_FUSED=prebuilt: code that does not ask for the fused CPU kernel uses it only if it is already
#   built, so no test of something else waits a minute for a compiler (tests/test_fused.py builds it);
# - LONGCTX_CPU_CACHE_MB=0: the caching CPU allocator stays off where the main commands and benchmarks
#   would turn it on (the suite runs many models of many sizes; tests/test_cpu_cache.py turns it on in
#   processes of its own).
os.environ.setdefault("LONGCTX_FUSED", "prebuilt")
os.environ.setdefault("LONGCTX_CPU_CACHE_MB", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# CI replays the same examples every run (a red CI is then reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("dev", deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# In-process tests use one thread: their matrices are tiny, and with two OpenMP threads a second busy
# process on a 2-core machine makes every small op wait on a barrier (seen: 13 s -> 190 s). Tests that
# measure or train at scale run in subprocesses with the default thread count.
torch.set_num_threads(1)


def pytest_configure(config):
    """Build the C++ extension into the cache once, before any test runs (in a process of its own, so that no
    test process has it loaded before it asks): which kernel a test's processes find (LONGCTX_FUSED=prebuilt:
    the fused one once it is built, else the pure-PyTorch one; equal within fp32 rounding, not in every bit)
    is then the same for every test, in any order and under pytest-xdist's workers (CI: .ci/run), instead of
    changing at the moment a test that asks for the kernel builds it. Where no compiler can build it, every
    test finds the pure-PyTorch kernel, and the extension's own tests skip (``cpp_extension``)."""
    if hasattr(config, "workerinput") or os.environ.get("LONGCTX_FUSED") == "0":
        return  # an xdist worker: the controller built it before starting the workers
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", "from longctx.attention import fused; fused.load(build=True)"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module")
def cpp_extension():
    """longctx's C++ extension (the fused band kernel and the CPU cache), built once (about a minute the
    first time, then loaded from the cache); the module is skipped where no compiler can build it."""
    from longctx.attention import fused

    why = fused.compiler_missing()
    if why is not None:
        pytest.skip(f"longctx's C++ extension needs a compiler: {why}")
    assert fused.load(build=True), fused._state["why_not"]
