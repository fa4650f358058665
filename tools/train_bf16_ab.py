"""A/B of bench train's longctx model (4 layers, hidden 256, 4 heads, 4,096 tokens) in one process, interleaved
by rounds: one step each of fp32, bf16 autocast with the fused kernel's micro-kernel, and bf16 with MKL's
products (LONGCTX_FUSED_GEMM=mkl), then torch.mm fp32 / bf16 (2048-square): per-round step speed-ups
against the same round's matmul ratio, medians over rounds.

    PYTHONPATH=src python tools/train_bf16_ab.py [rounds]
    T=1 CLOCK=cpu PYTHONPATH=src python tools/train_bf16_ab.py [rounds]   # one thread, timed in CPU time

T: torch threads (default: torch's); CLOCK=cpu: the process's CPU time instead of the wall clock (with
T=1, a busy shared machine does not inflate it; see tools/fused_bf16_ab.py).
"""
import os, sys, time, statistics, torch
from longctx.bench import train as T
from longctx.bench.train import DEFAULTS
from longctx import cpu_cache
from longctx.attention import fused
cpu_cache.setup()
fused.load()
cfg = dict(DEFAULTS, layers=4, hidden=256, heads=4, vocab=30522, attention_window=512)
n = 4096
def make(name):
    torch.manual_seed(0)
    model, _ = T.build("longctx", n, cfg); model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(5, cfg["vocab"], (1, n)); labels = torch.full((1, n), -100)
    chosen = torch.rand(1, n) < 0.15; labels[chosen] = ids[chosen]
    attn = torch.ones(1, n, dtype=torch.long)
    def step():
        opt.zero_grad(set_to_none=True)
        with T._precision(name):
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward(); opt.step()
    return step
steps = {"fp32": make("longctx"), "bf16": make("longctx-bf16"), "bf16-mkl": make("longctx-bf16")}
a32, b32 = torch.randn(2048, 2048), torch.randn(2048, 2048)
a16, b16 = a32.bfloat16(), b32.bfloat16()
if os.environ.get("T"):
    torch.set_num_threads(int(os.environ["T"]))
clock = time.process_time if os.environ.get("CLOCK") == "cpu" else time.perf_counter


def timeit(f):
    t = clock(); f(); return clock() - t
def run(name):
    if name == "bf16-mkl": os.environ["LONGCTX_FUSED_GEMM"] = "mkl"
    else: os.environ.pop("LONGCTX_FUSED_GEMM", None)
    return timeit(steps[name])
for k in steps: run(k)
res = {k: [] for k in list(steps) + ["mm32", "mm16"]}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
for r in range(rounds):
    for k in steps: res[k].append(run(k))
    res["mm32"].append(min(timeit(lambda: torch.mm(a32, b32)) for _ in range(3)))
    res["mm16"].append(min(timeit(lambda: torch.mm(a16, b16)) for _ in range(3)))
    print(r, {k: round(v[-1], 3) for k, v in res.items()}, os.getloadavg(), flush=True)
med = {k: statistics.median(v) for k, v in res.items()}
mmr = [a / b for a, b in zip(res["mm32"], res["mm16"])]
print("median step s", {k: round(v, 3) for k, v in med.items()})
print("per-round bf16/fp32 step speed-up:", [round(a / b, 2) for a, b in zip(res["fp32"], res["bf16"])])
print("per-round bf16-mkl/fp32 speed-up:", [round(a / b, 2) for a, b in zip(res["fp32"], res["bf16-mkl"])])
print("per-round mm bf16/fp32 ratio:", [round(x, 2) for x in mmr])
sp = [a / b for a, b in zip(res["fp32"], res["bf16"])]
print("median speed-up bf16 %.2f, bf16-mkl %.2f, mm ratio %.2f; speed-up / mm ratio %.2f" % (
    statistics.median(sp), statistics.median([a / b for a, b in zip(res["fp32"], res["bf16-mkl"])]),
    statistics.median(mmr), statistics.median([s / m for s, m in zip(sp, mmr)])))
