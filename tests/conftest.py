import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI replays the same examples every run (a red CI is then reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("dev", deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# In-process tests use one thread: their matrices are tiny, and with two OpenMP threads a second busy
# process on a 2-core machine makes every small op wait on a barrier (seen: 13 s -> 190 s). Tests that
# measure or train at scale run in subprocesses with the default thread count.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cpp_extension():
    """longctx's C++ extension (the fused band kernel and the CPU cache), built once (about a minute the
    first time, then loaded from the cache); the module is skipped where no compiler can build it."""
    from longctx.attention import fused

    why = fused.compiler_missing()
    if why is not None:
        pytest.skip(f"longctx's C++ extension needs a compiler: {why}")
    assert fused.load(build=True), fused._state["why_not"]
