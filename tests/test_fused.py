"""The fused C++ band kernel equals the dense reference (outputs and gradients, fp32 and bf16), on every
pattern of the mask family with padding, global tokens, ALiBi and separate global projections; and
without a compiler ``attention()`` falls back to the pure-PyTorch kernel and still gives the reference.

The extension is built once for this module (about a minute the first time on a 2-core machine, then
loaded from longctx's cache); the property cases themselves are small.
"""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx.attention import AttentionPattern, attention, fused
from longctx.attention.functional import resolve_backend
from longctx.errors import LongctxError
from longctx.positions import alibi_slopes
from test_attention_equivalence import _grads, flags, patterns

TOL = dict(atol=1e-5, rtol=1e-5)
# bf16 keeps 8 significant bits: unit roundoff u = 2^-8. In the bf16 path every product has exact bf16
# operands and fp32 accumulation; each output or gradient element passes through at most three bf16
# roundings (the operand the tile computed in fp32, P or dS; the upstream gradient; the result), each a
# relative error <= u/2 on terms whose absolute sum is at most a few times the largest result (softmax
# weights sum to 1; dS's terms cancel). 8u of the largest reference value bounds that with room for the
# cancellation; a wrong mask or a wrong statistic is off by O(1).
BF16_U = 2.0 ** -8
BF16_REL = 8 * BF16_U
# dS = P (dP - D) also cancels two fp32 sums of d products dO . v (the tile's product and the row's dO . O)
# whose exact difference can be 0 (a query that attends only itself has dq = 0): that leaves fp32 rounding,
# about 2^-24 d |dO| |v| per score, times |q| or |k| in dq and dk, whatever the largest reference value is.
FP32_U = 2.0 ** -24


pytestmark = pytest.mark.usefixtures("cpp_extension")  # built once (tests/conftest.py)


def _case(data, dtype=torch.float32):
    B, H = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    d = data.draw(st.sampled_from([8, 16, 64]))
    n = data.draw(st.integers(1, 400))
    pattern = data.draw(patterns(H))
    kpm, gm = data.draw(flags(B, n))
    use_alibi = data.draw(st.booleans())
    separate = gm is not None and data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**31))
    # the layer's layout: (B, n, H, d) memory seen as (B, H, n, d), which the kernel reads without a copy
    seq_major = data.draw(st.booleans())
    g = torch.Generator().manual_seed(seed)

    def tensor():
        if seq_major:
            return torch.randn(B, n, H, d, generator=g).to(dtype).transpose(1, 2).requires_grad_()
        return torch.randn(B, H, n, d, generator=g).to(dtype).requires_grad_()

    inputs = [tensor() for _ in range(6 if separate else 3)]
    kw = dict(key_padding_mask=kpm, global_mask=gm, alibi_slopes=alibi_slopes(H) if use_alibi else None)
    return pattern, inputs, kw, seed, kpm


def _reference(pattern, inputs, kw, seed, kpm):
    """Dense attention in float64 on the same (possibly bf16-rounded) values: the oracle's own rounding
    is negligible, so what is measured is the fused kernel's."""
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    kw64 = dict(kw, global_qkv=tuple(x64[3:]) if len(x64) == 6 else None,
                alibi_slopes=None if kw["alibi_slopes"] is None else kw["alibi_slopes"].double())
    out = attention(*x64[:3], pattern, backend="dense", **kw64)
    return out, _grads(out, x64, seed, kpm)


def _fused(pattern, inputs, kw, seed, kpm):
    kw = dict(kw, global_qkv=tuple(inputs[3:]) if len(inputs) == 6 else None)
    if kw["alibi_slopes"] is not None:
        kw["alibi_slopes"] = kw["alibi_slopes"].to(inputs[0].dtype)
    out = attention(*inputs[:3], pattern, backend="fused", **kw)
    return out, _grads(out, inputs, seed, kpm)


def _rows(kpm):  # padding queries' outputs are discarded by every model (and get no upstream gradient)
    return torch.ones(1, 1, 1, 1, dtype=torch.bool) if kpm is None else kpm[:, None, :, None]


@pytest.mark.slow
@settings(max_examples=200)
@given(data=st.data())
def test_fused_equals_dense_reference_fp32(data):
    pattern, inputs, kw, seed, kpm = _case(data)
    ref, ref_grads = _reference(pattern, inputs, kw, seed, kpm)
    out, grads = _fused(pattern, inputs, kw, seed, kpm)
    rows = _rows(kpm)
    torch.testing.assert_close(torch.where(rows, out, 0), torch.where(rows, ref.float(), 0), **TOL)
    for name, a, b, x in zip(["q", "k", "v", "qg", "kg", "vg"], grads, ref_grads, inputs):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b.float()
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"grad {name}, {pattern}: {m}")


def _products(path, monkeypatch):
    """bf16 products on the kernel's AVX512-BF16 micro-kernel ("own", where the build has it; MKL
    otherwise) or on MKL's gemm_bf16bf16f32 ("mkl": LONGCTX_FUSED_GEMM, read per call)."""
    if path == "mkl":
        monkeypatch.setenv("LONGCTX_FUSED_GEMM", "mkl")
    else:
        monkeypatch.delenv("LONGCTX_FUSED_GEMM", raising=False)


@pytest.mark.parametrize("path", ["own", "mkl"])
@settings(max_examples=80)
@given(data=st.data())
def test_fused_bf16_within_bf16_precision(path, monkeypatch, data):
    _products(path, monkeypatch)
    _check_bf16(*_case(data, torch.bfloat16))


@pytest.mark.parametrize("path", ["own", "mkl"])
@pytest.mark.parametrize("pattern, n, d", [
    (AttentionPattern("blocks", block=9), 100, 16),  # odd chunks: bands start at odd key rows
    (AttentionPattern("blockwise_causal", block=7), 61, 8),
    (AttentionPattern("sliding", window=5, dilation=(1, 3)), 77, 64),
    (AttentionPattern("sliding", window=40, causal=True), 230, 33)])  # odd head dimension
def test_bf16_odd_geometry(path, pattern, n, d, monkeypatch):
    """Shapes where the micro-kernel's pairs of keys start at odd rows, odd head dimensions, random
    padding, global tokens with separate projections and ALiBi: both product paths within the bf16 bound."""
    _products(path, monkeypatch)
    g = torch.Generator().manual_seed(7)
    B, H = 2, 2
    inputs = [torch.randn(B, n, H, d, generator=g).bfloat16().transpose(1, 2).requires_grad_() for _ in range(6)]
    kpm = torch.rand(B, n, generator=g) < 0.85
    kw = dict(key_padding_mask=kpm, global_mask=torch.rand(B, n, generator=g) < 0.05, alibi_slopes=alibi_slopes(H))
    _check_bf16(pattern, inputs, kw, 7, kpm)


def _check_bf16(pattern, inputs, kw, seed, kpm):
    ref, ref_grads = _reference(pattern, inputs, kw, seed, kpm)
    out, grads = _fused(pattern, inputs, kw, seed, kpm)
    assert out.dtype == torch.bfloat16
    rows = _rows(kpm)
    pairs = [("out", torch.where(rows, out, 0), torch.where(rows, ref, 0))]
    pairs += [(name, a, b) for name, a, b in zip(["q", "k", "v", "qg", "kg", "vg"], grads, ref_grads)
              if a is not None or b is not None]
    amax = [t.detach().abs().max().item() for t in inputs]
    d = inputs[0].shape[-1]
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).abs().max().item()  # _grads' draw
    floor = 1e-6 + FP32_U * d * up * max(amax[2::3]) * max(amax[0:2] + amax[3:5])
    # dQ and dK: the kernel (as FlashAttention) forms D = rowsum(dO * O) from the bf16 output, an error of
    # about one bf16 unit of D (a mean of the row's dP = dO v^T) in every dS = P (dP - D); where dP - D
    # cancels (two keys with equal dP: n = 2, causal) the gradient is small and this term is all its error,
    # so it is bounded by the terms' size, not the result's: u |dP|max / sqrt(d) |k|max (|q|max for dK)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).double()
    dp = max((do @ t.detach().double().transpose(-1, -2)).abs().max().item() for t in inputs[2::3])
    d_term = {"q": max(amax[1::3]), "k": max(amax[0::3]), "qg": max(amax[1::3]), "kg": max(amax[0::3])}
    for name, a, b in pairs:
        a = torch.zeros_like(b) if a is None else a.double()
        b = torch.zeros_like(a) if b is None else b
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        bound = BF16_REL * scale + floor + (2 * BF16_U * dp / d ** 0.5 * d_term[name] if name in d_term else 0.0)
        assert err <= bound, f"{name}, {pattern}: error {err:.3g} > {bound:.3g} (scale {scale:.3g})"


MICRO = "avx512-bf16 micro-kernel"


def test_bf16_exp_relative_error():
    """The bf16 kernel's softmax exp (2^f by a degree-4 polynomial, its docstring in band_attention.cpp):
    against float64 exp of the same fp32 arguments, relative error under 1e-5 over [-86.9, 0] (the bf16
    rounding right after is 2^-9 = 2e-3), so P's error is the rounding's; never a denormal; vector lanes
    and the scalar tail agree."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-86.9, 0.0, 200_001), -torch.rand(100_000, generator=g) * 20, torch.tensor([-0.0])])
    got = torch.ops.longctx_fused.bf16_exp(x).double()
    exact = x.double().exp()
    assert ((got - exact).abs() / exact).max().item() < 1e-5
    assert (got >= torch.finfo(torch.float32).tiny).all()
    tail = x[:21].contiguous()  # 16 lanes and 5 scalars: the same values
    assert torch.equal(torch.ops.longctx_fused.bf16_exp(tail), torch.ops.longctx_fused.bf16_exp(x)[:21])
    far = torch.ops.longctx_fused.bf16_exp(torch.tensor([-100.0, -1e4, float("-inf")]))
    tiny = torch.finfo(torch.float32).tiny  # clamped at about 2^-125.5; masked pairs are zeroed by their mask
    assert ((far >= tiny) & (far < 2 * tiny)).all()


@pytest.mark.parametrize("acc", [False, True])
def test_bf16_micro_kernel_product(acc, monkeypatch):
    """The micro-kernel's product C [+]= A B (bf16 A, B; fp32 C) against fp32 matmul of the same bf16 values:
    the products of two bf16 values are exact in fp32, so only the order of the sums differs (k roundings
    of at most 2^-24 of the running sum's size). Awkward shapes: odd k (a half pair), columns past a
    register tile, one row; rows strided; a NaN right after B's last row must not reach C."""
    monkeypatch.delenv("LONGCTX_FUSED_GEMM", raising=False)
    if fused.bf16_products() != MICRO:
        pytest.skip(f"bf16 products here: {fused.bf16_products()}")
    g = torch.Generator().manual_seed(1)
    sizes = (1, 7, 33, 64, 65, 130)
    for m, n, k in itertools.product(sizes, repeat=3):
        a = torch.randn(m, k + 3, generator=g).bfloat16()[:, :k]
        b_rows = torch.randn(k + 1, n + 5, generator=g).bfloat16()
        b_rows[k] = float("nan")
        b = b_rows[:k, :n]
        c = torch.randn(m, n, generator=g)
        got = torch.ops.longctx_fused.bf16_gemm(a, b, c, acc, True)
        exact = a.double() @ b.double() + (c.double() if acc else 0)
        size = a.double().abs() @ b.double().abs() + (c.double().abs() if acc else 0)
        ref = (a.float() @ b.float() + (c if acc else 0)).double()
        assert ((got.double() - exact).abs() <= (k + 1) * FP32_U * size).all(), (m, n, k, acc)
        assert ((got.double() - ref).abs() <= 2 * (k + 1) * FP32_U * size).all(), (m, n, k, acc)
    monkeypatch.setenv("LONGCTX_FUSED_GEMM", "mkl")
    assert "MKL" in fused.bf16_products()


@pytest.mark.parametrize("pattern", [AttentionPattern("sliding", window=20), AttentionPattern("blocks", block=16),
                                     AttentionPattern("sliding", window=9, dilation=(1, 3), causal=True)])
def test_mkl_products_equal_dense_reference(pattern, monkeypatch):
    """fp32 products run on oneDNN's BRGEMM by default; LONGCTX_FUSED_GEMM=mkl (read per call) runs the
    same kernel on MKL's sgemm, the path of a CPU where BRGEMM is not what is wanted. Random padding and
    global tokens, separate global projections, ALiBi: every product and mask branch."""
    monkeypatch.setenv("LONGCTX_FUSED_GEMM", "mkl")
    g = torch.Generator().manual_seed(5)
    B, H, n, d = 2, 2, 150, 16
    inputs = [torch.randn(B, H, n, d, generator=g).requires_grad_() for _ in range(6)]
    kpm = torch.rand(B, n, generator=g) < 0.85
    kw = dict(key_padding_mask=kpm, global_mask=torch.rand(B, n, generator=g) < 0.05, alibi_slopes=alibi_slopes(H))
    ref, ref_grads = _reference(pattern, inputs, kw, 5, kpm)
    out, grads = _fused(pattern, inputs, kw, 5, kpm)
    rows = _rows(kpm)
    torch.testing.assert_close(torch.where(rows, out, 0), torch.where(rows, ref.float(), 0), **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b.float(), **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", [AttentionPattern("sliding", window=40, dilation=(1, 3)),
                                     AttentionPattern("blockwise_causal", block=24),
                                     AttentionPattern("sliding", window=30, causal=True)])
def test_segments_of_long_sequences(pattern, dtype):
    """Past 2,048 queries the kernel splits each head into segments whose bands share key rows at their
    borders (backward: the even segments' dK, dV first, the odd ones added; in bf16 the shared rows are
    summed in fp32 and rounded once). 4,500 tokens make three segments with borders inside the band;
    padding, global tokens, separate global projections and ALiBi cross them. Against the float64 dense
    reference (fp32's tolerance, or the bf16 bound), and bit-identical with one thread and with two."""
    g = torch.Generator().manual_seed(11)
    B, H, n, d = 1, 2, 4500, 8
    inputs = [torch.randn(B, n, H, d, generator=g).to(dtype).transpose(1, 2).requires_grad_() for _ in range(6)]
    kpm = torch.rand(B, n, generator=g) < 0.9
    kw = dict(key_padding_mask=kpm, global_mask=torch.rand(B, n, generator=g) < 0.002, alibi_slopes=alibi_slopes(H))
    ref, ref_grads = _reference(pattern, inputs, kw, 11, kpm)
    rows = _rows(kpm)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(_fused(pattern, inputs, kw, 11, kpm))
    finally:
        torch.set_num_threads(threads)
    (out, grads), (out2, grads2) = runs
    if dtype == torch.bfloat16:
        _check_bf16(pattern, inputs, kw, 11, kpm)
    else:
        torch.testing.assert_close(torch.where(rows, out, 0), torch.where(rows, ref.float(), 0), **TOL)
    for a, b, c in zip(grads, ref_grads, grads2):
        assert a.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a, b.float(), **TOL)
        assert torch.equal(a, c)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("pattern", [AttentionPattern("sliding", window=7, dilation=(1, 2)),
                                     AttentionPattern("blockwise_causal", block=9)])
def test_alibi_slope_gradient(pattern):
    """Slope gradients sum O(n w) terms with cancellation: in fp32 to a tolerance relative to that sum."""
    g = torch.Generator().manual_seed(3)
    B, H, n, d = 2, 2, 70, 8
    q, k, v = (torch.randn(B, H, n, d, generator=g).requires_grad_() for _ in range(3))
    slopes = torch.rand(H, generator=g).requires_grad_()
    kw = dict(key_padding_mask=torch.rand(B, n, generator=g) < 0.9, global_mask=torch.rand(B, n, generator=g) < 0.05)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v, slopes)]
    ref = _grads(attention(*x64[:3], pattern, backend="dense", alibi_slopes=x64[3], **kw), x64, 0)
    got = _grads(attention(q, k, v, pattern, backend="fused", alibi_slopes=slopes, **kw), [q, k, v, slopes], 0)
    torch.testing.assert_close(got[3].double(), ref[3], atol=1e-3, rtol=1e-4)


def test_blocked_chooses_fused_when_built():
    q = torch.zeros(1, 1, 4, 8)
    assert resolve_backend("blocked", q, AttentionPattern("sliding", window=2)) == "fused"
    assert resolve_backend("auto", q, AttentionPattern("blocks", block=2)) == "fused"
    assert resolve_backend("blocked", q.half(), AttentionPattern("sliding", window=2)) == "blocked-torch"


FALLBACK = textwrap.dedent("""
    import logging, torch
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from longctx.attention import AttentionPattern, attention
    from longctx.attention import fused
    from longctx.errors import LongctxError
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 50, 8, generator=g, requires_grad=True) for _ in range(3))
    p = AttentionPattern("sliding", window=5)
    kw = dict(key_padding_mask=torch.rand(2, 50, generator=g) < 0.8, global_mask=torch.rand(2, 50, generator=g) < 0.1)
    out = attention(q, k, v, p, backend="blocked", **kw)
    out2 = attention(q, k, v, p, backend="blocked", **kw)  # announced once, not per call
    ref = attention(q, k, v, p, backend="dense", **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    gq = torch.autograd.grad(out.sum(), q)[0]
    torch.testing.assert_close(gq, torch.autograd.grad(ref.sum(), q)[0], atol=1e-5, rtol=1e-5)
    assert not fused._state["loaded"]
    try:
        attention(q, k, v, p, backend="fused")
        raise SystemExit("backend fused did not raise")
    except LongctxError as e:
        print("ERROR:", e)
""")


@pytest.mark.slow
def test_fallback_without_compiler(tmp_path):
    """A machine with no C++ compiler on PATH (and an empty cache): the pure-PyTorch kernel, announced
    once, equal to the reference; backend "fused" is one sentence."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(sys.executable, bindir / "python")  # PATH holds only the interpreter: no c++, no g++
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "LONGCTX_FUSED")}
    env.update(PATH=str(bindir), LONGCTX_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("fused CPU attention kernel unavailable: no C++ compiler") == 1, r.stderr
    assert "ERROR: backend 'fused' is unavailable: no C++ compiler" in r.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", [AttentionPattern("sliding", window=20), AttentionPattern("sliding", window=33, causal=True),
                                     AttentionPattern("blocks", block=9)])
def test_grouped_query_heads_are_read_not_repeated(dtype, pattern):
    """k, v with 2 heads for 8 query heads (Mistral's grouping): the kernel reads each key head for its four
    query heads and sums their gradients per group, with random padding and ALiBi. It equals the same kernel on
    repeated k, v (autograd then sums the copies): the output bit for bit, the gradients within one rounding;
    and fp32 equals the float64 dense reference within fp32's tolerance."""
    from longctx.attention.functional import repeat_kv
    from longctx.attention.fused import fused_band_attention

    g = torch.Generator().manual_seed(11)
    B, H, Hkv, n, d = 2, 8, 2, 150, 24
    q = torch.randn(B, n, H, d, generator=g).to(dtype).transpose(1, 2)  # the layer's (B, n, H, d) memory
    k, v = (torch.randn(B, Hkv, n, d, generator=g).to(dtype) for _ in range(2))
    kpm = torch.rand(B, n, generator=g) < 0.85
    slopes = alibi_slopes(H)
    pos = torch.arange(n)

    def run(q, k, v, kernel):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        kk, vv = (k, v) if kernel == "gqa" else (repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv))
        if kernel == "dense":
            out = attention(q, kk, vv, pattern, key_padding_mask=kpm, alibi_slopes=slopes.double(), backend="dense")
        else:
            out = fused_band_attention(q, kk, vv, pattern, pos, key_valid=kpm, alibi_slopes=slopes,
                                       scale=d ** -0.5)
        return out, _grads(out, (q, k, v), 3, kpm)

    out, grads = run(q, k, v, "gqa")
    assert [t.shape for t in grads] == [q.shape, k.shape, v.shape]
    rep, rep_grads = run(q, k, v, "repeat")
    assert torch.equal(out, rep)
    for a, b in zip(grads, rep_grads):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 2 ** -8, atol=1e-7)
    if dtype == torch.float32:
        ref, ref_grads = run(*(x.double() for x in (q, k, v)), "dense")
        rows = kpm[:, None, :, None]
        torch.testing.assert_close(torch.where(rows, out, 0).double(), torch.where(rows, ref, 0), rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_grouped_query_through_attention_on_every_band_backend():
    """``attention`` takes k, v with fewer heads: the fused kernel natively, the pure-PyTorch one and the
    dense reference on repeated heads (as do the layouts the fused kernel does not take: per-head
    dilations, global tokens); all agree."""
    g = torch.Generator().manual_seed(12)
    B, H, Hkv, n, d = 1, 6, 3, 90, 16
    q = torch.randn(B, H, n, d, generator=g)
    k, v = torch.randn(B, Hkv, n, d, generator=g), torch.randn(B, Hkv, n, d, generator=g)
    gm = torch.zeros(B, n, dtype=torch.bool)
    gm[:, 0] = True
    for pattern, kw in ((AttentionPattern("sliding", window=10), {}),
                        (AttentionPattern("sliding", window=10, dilation=(1, 1, 1, 2, 2, 2)), {}),
                        (AttentionPattern("sliding", window=10), {"global_mask": gm})):
        ref = attention(q.double(), k.double(), v.double(), pattern, backend="dense",
                        **kw)
        for backend in ("fused", "blocked-torch"):
            out = attention(q, k, v, pattern, backend=backend, **kw)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=f"{backend} {pattern}")
    with pytest.raises(LongctxError, match="grouped-query"):
        attention(q, torch.randn(B, 4, n, d), torch.randn(B, 4, n, d), AttentionPattern("sliding", window=10))


def test_grouped_query_reaches_the_fused_kernel_unrepeated(monkeypatch):
    """Which calls repeat the key heads: none for a plain band on the fused kernel (the kernel reads the
    Hkv heads), both k and v for per-head dilations, global tokens and the pure-PyTorch kernel."""
    from longctx.attention import functional

    calls = []
    real = functional.repeat_kv
    monkeypatch.setattr(functional, "repeat_kv", lambda x, g: calls.append(x.shape[1]) or real(x, g))
    B, H, Hkv, n, d = 1, 4, 2, 70, 8
    q, k, v = torch.randn(B, H, n, d), torch.randn(B, Hkv, n, d), torch.randn(B, Hkv, n, d)
    gm = torch.zeros(B, n, dtype=torch.bool)
    gm[:, 3] = True
    for pattern, kw, backend, repeats in (
            (AttentionPattern("sliding", window=9), {}, "fused", 0),
            (AttentionPattern("sliding", window=9, causal=True), {"key_padding_mask": torch.rand(B, n) < 0.9}, "fused", 0),
            (AttentionPattern("sliding", window=9, dilation=(1, 1, 2, 2)), {}, "fused", 2),
            (AttentionPattern("sliding", window=9), {"global_mask": gm}, "fused", 2),
            (AttentionPattern("sliding", window=9), {}, "blocked-torch", 2)):
        calls.clear()
        attention(q, k, v, pattern, backend=backend, **kw)
        assert len(calls) == repeats and all(c == Hkv for c in calls), (pattern, backend, calls)


def test_grouped_query_bf16_over_several_segments():
    """4,500 tokens in bf16: several backward segments, whose shared key rows go through the fp32 side buffer
    per query head; the same bits as the kernel on repeated heads, on 1 and on 2 threads."""
    from longctx.attention.functional import repeat_kv
    from longctx.attention.fused import fused_band_attention

    g = torch.Generator().manual_seed(13)
    B, H, Hkv, n, d = 1, 4, 2, 4500, 16
    q = torch.randn(B, H, n, d, generator=g).bfloat16()
    k, v = (torch.randn(B, Hkv, n, d, generator=g).bfloat16() for _ in range(2))
    pattern, pos = AttentionPattern("sliding", window=64), torch.arange(n)

    def run(repeat: bool):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        a, b = (repeat_kv(kk, 2), repeat_kv(vv, 2)) if repeat else (kk, vv)
        out = fused_band_attention(qq, a, b, pattern, pos, scale=d ** -0.5)
        return (out, *_grads(out, (qq, kk, vv), 5))

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(False)
        torch.set_num_threads(2)
        two, rep = run(False), run(True)
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one, two, rep):
        assert torch.equal(a, b) and torch.equal(a, c)
