"""Time and minor page faults of one mechanism's fwd+bwd at 4,096 and 32,768 tokens, in one process.

    python benchmarks/faults.py lsh '{"chunk_length": 64, "num_buckets": 64, "n_hashes": 2}'
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/faults.py lsh '{"chunk_length": 64, "num_buckets": 64, "n_hashes": 2}'
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/faults.py lsh '{...}'

The first under the defaults (what longctx and its benchmarks run with), the second with PyTorch's
tensors of 2 MiB and more on transparent huge pages, the third with glibc keeping freed memory
(docs/benchmarks.md: neither is a default, each costs something somewhere).

(12 heads of 64, batch 1, fp32; median of the last four of six steps.) The page faults are the freshly
mapped memory glibc hands out for every tensor over its mmap threshold (docs/benchmarks.md).
"""
import json
import resource
import statistics
import sys
import time

import torch

from longctx.attention import LayerContext, build
from longctx.memory import peak_rss_bytes


def main(name: str, spec: dict) -> None:
    torch.manual_seed(0)
    times = {}
    for n in (4096, 32768):
        mech = build(name, spec, LayerContext(num_heads=12, head_dim=64, max_len=n, seed=0, layer_idx=0))
        q, k, v = (torch.randn(1, 12, n, 64, requires_grad=True) for _ in range(3))
        up = torch.randn(1, 12, n, 64)
        steps = []
        for _ in range(6):
            t = time.perf_counter()
            mech(q, k, v).backward(up)
            steps.append(time.perf_counter() - t)
        times[n] = statistics.median(steps[2:])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        mech(q, k, v).backward(up)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(f"{name} n={n}: fwd+bwd {times[n]:.3f} s, {faults} minor page faults per step")
    print(f"time(32768) / time(4096) = {times[32768] / times[4096]:.2f}; peak resident {peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
