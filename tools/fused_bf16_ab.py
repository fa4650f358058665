"""A/B of the fused core in one process, interleaved by rounds (the machine is shared: a round compares
numbers measured seconds apart): core-sliding (12 x 64 heads, n 4096, window 256, batch 1) forward and
forward+backward in fp32, bf16 on the AVX512-BF16 micro-kernel and bf16 on MKL (LONGCTX_FUSED_GEMM=mkl,
read per call), and the 2048-square torch.mm in fp32 and bf16; each round's useful FLOP/s as a fraction
of the same round's matmul rate (as `longctx bench attention` counts them), medians over rounds.

    T=1 PYTHONPATH=src python tools/fused_bf16_ab.py [rounds]     # T: torch threads (default 2)

CLOCK=cpu times with the process's CPU time instead of the wall clock: with T=1 that is the one
thread's own time, which a busy shared machine does not inflate (a switched-out thread is not charged),
so the fractions hold still between rounds where wall times swing 2-5x.
"""
import os, sys, time, statistics, torch
from longctx.attention import fused, AttentionPattern, attention
fused.load()
torch.set_num_threads(int(os.environ.get("T", "2")))
n, H, d = 4096, 12, 64
p = AttentionPattern("sliding", window=256)
g = torch.Generator().manual_seed(0)
base = [torch.randn(1, H, n, d, generator=g) for _ in range(4)]
def case(dtype):
    q, k, v = (x.to(dtype).requires_grad_() for x in base[:3])
    up = base[3].to(dtype)
    def fwd():
        with torch.no_grad(): attention(q, k, v, p, backend="fused")
    def step():
        q.grad = k.grad = v.grad = None
        attention(q, k, v, p, backend="fused").backward(up)
    return fwd, step
cases = {"fp32": case(torch.float32), "bf16": case(torch.bfloat16), "bf16-mkl": case(torch.bfloat16)}
a32, b32 = torch.randn(2048, 2048), torch.randn(2048, 2048)
a16, b16 = a32.bfloat16(), b32.bfloat16()
clock = time.process_time if os.environ.get("CLOCK") == "cpu" else time.perf_counter


def t(f, reps=3):
    best = 1e9
    for _ in range(reps):
        s = clock(); f(); best = min(best, clock() - s)
    return best
pairs = sum(min(n, i + 257) - max(0, i - 256) for i in range(n))
fl = 4 * pairs * d * H  # the bench's useful FLOPs of the core (Mechanism.flops): QK^T and PV
rows = []
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    row = {"mm32": 2 * 2048**3 / t(lambda: torch.mm(a32, b32)) / 1e9, "mm16": 2 * 2048**3 / t(lambda: torch.mm(a16, b16)) / 1e9}
    for name, (fwd, step) in cases.items():
        if name == "bf16-mkl": os.environ["LONGCTX_FUSED_GEMM"] = "mkl"
        else: os.environ.pop("LONGCTX_FUSED_GEMM", None)
        if r == 0: fwd(); step()
        row[name + " fwd"], row[name + " train"] = t(fwd), t(step)
    for name in cases:
        mm = row["mm32"] if name == "fp32" else row["mm16"]
        row[name + " fwd%"] = fl / row[name + " fwd"] / 1e9 / mm
        row[name + " train%"] = 3 * fl / row[name + " train"] / 1e9 / mm
    rows.append(row)
    print(r, " ".join(f"{k} {v:.3f}" for k, v in row.items()), os.getloadavg(), flush=True)
med = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
print("threads", torch.get_num_threads(), "clock", clock.__name__, "median:", " ".join(f"{k} {v:.3f}" for k, v in med.items()))
print("bf16 vs fp32 time: fwd %.2fx, fwd+bwd %.2fx; bf16 micro-kernel vs MKL: fwd %.2fx, fwd+bwd %.2fx" % (
    statistics.median(x["fp32 fwd"] / x["bf16 fwd"] for x in rows), statistics.median(x["fp32 train"] / x["bf16 train"] for x in rows),
    statistics.median(x["bf16-mkl fwd"] / x["bf16 fwd"] for x in rows), statistics.median(x["bf16-mkl train"] / x["bf16 train"] for x in rows)))
