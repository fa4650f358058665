import os

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
