"""What the stop agreement costs a distributed run: the one all-reduce (MAX) of a one-element flag that
every process makes at every step boundary (longctx.train.trainer.StopRequests.stop_now). Runs a
pretraining (the tiny model of tests/test_stop_signals.py, 60 steps, unless overrides say otherwise)
and times, on rank 0, each step from boundary to boundary (step, logging, the flag), the step itself and
the flag; then the same all-reduce alone, 2000 times. FLAG=off replaces the all-reduce with the
process's own flag (what a one-process run does), for an A/B of the whole step: run both, alternately,
on the same machine.

    PYTHONPATH=src python -m torch.distributed.run --nproc_per_node 2 tools/stop_flag_overhead.py \
        --out /tmp/stop-overhead data.corpus=DIR [KEY=VALUE ...]
    FLAG=off PYTHONPATH=src python -m torch.distributed.run ... (the same)

The flag's own time includes waiting for the slower process: without the flag that wait moves into the
next collective (the next step's gradient all-reduce), so the boundary-to-boundary A/B is the cost. The
run folder must not hold checkpoints (a fresh --out each time)."""
import os
import statistics
import sys
import time

import torch

from longctx.cli import main
from longctx.train import trainer

TINY = ["data.tokenizer=bytes", "data.seq_len=64", "model.hidden_size=16", "model.num_hidden_layers=1",
        "model.num_attention_heads=2", "model.window=8", "model.max_position_embeddings=64", "train.steps=60",
        "train.batch_size=1", "train.save_every=0", "train.log_every=10", "train.eval_batches=1"]
steps, flags, boundaries = [], [], []


def timed(fn, into):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        into.append(time.perf_counter() - t0)
        return out
    return wrapper


trainer.Trainer.step = timed(trainer.Trainer.step, steps)
if os.environ.get("FLAG") == "off":
    def local(self):
        self.stopping = self.requested
        return self.stopping
    trainer.StopRequests.stop_now = local
stop_now = timed(trainer.StopRequests.stop_now, flags)


def at_boundary(self):
    out = stop_now(self)
    boundaries.append(time.perf_counter())
    return out


trainer.StopRequests.stop_now = at_boundary
args = sys.argv[1:]
code = main(["pretrain", "--quiet", *TINY, *args])
dist = torch.distributed
if dist.is_initialized() and dist.get_world_size() > 1:
    flag = torch.zeros(1, dtype=torch.int32)
    for _ in range(50):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    alone = []
    for _ in range(2000):
        t0 = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        alone.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        it = [b - a for a, b in zip(boundaries[5:], boundaries[6:])]
        m = statistics.median
        print(f"FLAG={os.environ.get('FLAG', 'on')} world {dist.get_world_size()} ({dist.get_backend()}), {len(steps)} "
              f"steps: boundary to boundary {m(it) * 1e3:.2f} ms (mean {statistics.mean(it) * 1e3:.2f}), step() "
              f"{m(steps[5:]) * 1e3:.2f} ms, stop flag {m(flags[5:]) * 1e6:.0f} us; the all-reduce alone, median of "
              f"2000: {m(alone) * 1e6:.0f} us", flush=True)
sys.exit(code)
