"""Every fast kernel equals the dense reference, on outputs and gradients, for random cases.

The reference builds the n x n mask from the pattern's predicate; the fast kernels never do. Cases cover
batch 1-3, heads 1-4, head size 8-64, n from 1 to 600 (not multiples of window or block), random
window / block / per-head dilation, padding, global tokens (none, some, all), causal and bidirectional,
ALiBi slopes and Longformer's separate global projections.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx.attention import AttentionPattern, SelfAttention, attention
from longctx.positions import POSITION_KINDS, alibi_slopes

TOL = dict(atol=1e-5, rtol=1e-5)


@st.composite
def patterns(draw, num_heads):
    kind = draw(st.sampled_from(["full", "sliding", "sliding", "blocks", "blockwise_causal"]))
    causal = draw(st.booleans())
    if kind == "sliding":
        window = draw(st.integers(0, 80))
        dil = draw(st.one_of(st.just(1), st.lists(st.integers(1, 4), min_size=num_heads, max_size=num_heads)))
        return AttentionPattern("sliding", window=window, dilation=tuple(dil) if isinstance(dil, list) else dil,
                                causal=causal)
    if kind in ("blocks", "blockwise_causal"):
        return AttentionPattern(kind, block=draw(st.integers(1, 96)), causal=causal)
    return AttentionPattern("full", causal=causal)


@st.composite
def flags(draw, B, n):
    """(key_padding_mask, global_mask) with none / some / all of each kind."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    pad_mode = draw(st.sampled_from(["none", "right", "random"]))
    kpm = None
    if pad_mode != "none":
        if pad_mode == "right":
            lengths = torch.randint(0, n + 1, (B,), generator=g)
            kpm = torch.arange(n)[None, :] < lengths[:, None]
        else:
            kpm = torch.rand(B, n, generator=g) < 0.8
    glob_mode = draw(st.sampled_from(["none", "none", "some", "all"]))
    gm = None
    if glob_mode == "some":
        gm = torch.rand(B, n, generator=g) < draw(st.sampled_from([0.02, 0.1, 0.3]))
    elif glob_mode == "all":
        gm = torch.ones(B, n, dtype=torch.bool)
    return kpm, gm


def _grads(out, inputs, seed, query_valid=None):
    """Gradients of <out, random upstream>. Rows of padding queries, whose outputs every model discards,
    get no upstream gradient (their far-away ALiBi biases make them the only rows where fp32 rounding
    of the scores reaches 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g).to(out.dtype)
    if query_valid is not None:
        shape = (out.shape[0], 1, -1, 1) if out.dim() == 4 else (out.shape[0], -1, 1)
        upstream = upstream * query_valid.view(shape).to(out.dtype)
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True)


@pytest.mark.slow
@settings(max_examples=700)
@given(data=st.data())
def test_kernels_equal_dense_reference(data):
    B, H = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    d = data.draw(st.sampled_from([8, 16, 32, 64]))
    n = data.draw(st.integers(1, 600))
    pattern = data.draw(patterns(H))
    kpm, gm = data.draw(flags(B, n))
    use_alibi = data.draw(st.booleans())
    separate = gm is not None and data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g).requires_grad_() for _ in range(3))
    slopes = alibi_slopes(H) if use_alibi else None  # the paper's slopes; slope gradients: the fp64 test
    gqkv = tuple(torch.randn(B, H, n, d, generator=g).requires_grad_() for _ in range(3)) if separate else None
    inputs = [q, k, v] + (list(gqkv) if separate else [])
    backends = ["blocked"] + (["sdpa"] if pattern.kind == "full" else [])
    kw = dict(key_padding_mask=kpm, global_mask=gm, global_qkv=gqkv, alibi_slopes=slopes)
    # the oracle runs in float64 on the same inputs, so only the fast kernel's fp32 rounding is measured
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    q64, k64, v64 = inputs64[:3]
    kw64 = dict(kw, alibi_slopes=None if slopes is None else slopes.double(),
                global_qkv=tuple(inputs64[-3:]) if separate else None)
    ref64 = attention(q64, k64, v64, pattern, backend="dense", **kw64)
    ref_grads = [None if t is None else t.float() for t in _grads(ref64, inputs64, seed, kpm)]
    ref = ref64.float()
    rows = torch.ones(1, 1, 1, 1, dtype=torch.bool) if kpm is None else kpm[:, None, :, None]
    for backend in backends:
        out = attention(q, k, v, pattern, backend=backend, **kw)
        assert out.shape == (B, H, n, d)
        torch.testing.assert_close(torch.where(rows, out, 0), torch.where(rows, ref, 0), **TOL,
                                   msg=lambda m: f"{backend} output, {pattern}: {m}")
        names = ["q", "k", "v"] + (["qg", "kg", "vg"] if separate else [])
        for name, a, b, x in zip(names, _grads(out, inputs, seed, kpm), ref_grads, inputs):
            a = torch.zeros_like(x) if a is None else a  # unused input: zero gradient
            b = torch.zeros_like(x) if b is None else b
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{backend} grad {name}, {pattern}: {m}")


@pytest.mark.parametrize("pattern", [
    AttentionPattern("sliding", window=9, dilation=(1, 3)),
    AttentionPattern("sliding", window=6, causal=True),
    AttentionPattern("blocks", block=13),
    AttentionPattern("blockwise_causal", block=13),
    AttentionPattern("full"),
    AttentionPattern("full", causal=True),
])
def test_alibi_slope_gradients_in_float64(pattern):
    """A slope's gradient sums O(n^2) terms with heavy cancellation, so fp32 rounding dominates any
    comparison; in float64 the fast kernels must match the reference to 1e-10."""
    g = torch.Generator().manual_seed(1)
    B, H, n, d = 2, 2, 157, 8
    q, k, v = (torch.randn(B, H, n, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    slopes = torch.rand(H, generator=g, dtype=torch.float64).requires_grad_()
    kpm = torch.rand(B, n, generator=g) < 0.9
    gm = torch.rand(B, n, generator=g) < 0.05
    kw = dict(key_padding_mask=kpm, global_mask=gm, alibi_slopes=slopes)
    ref = _grads(attention(q, k, v, pattern, backend="dense", **kw), [q, k, v, slopes], 0)
    for backend in ["blocked"] + (["sdpa"] if pattern.kind == "full" else []):
        got = _grads(attention(q, k, v, pattern, backend=backend, **kw), [q, k, v, slopes], 0)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.slow
@settings(max_examples=300)
@given(data=st.data())
def test_layer_fast_equals_dense_for_every_position_encoding(data):
    B, H = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4))
    d = data.draw(st.sampled_from([8, 16, 32]))
    n = data.draw(st.integers(1, 300))
    pattern = data.draw(patterns(H))
    position = data.draw(st.sampled_from(POSITION_KINDS))
    kpm, gm = data.draw(flags(B, n))
    separate = data.draw(st.booleans())
    torch.manual_seed(data.draw(st.integers(0, 2**31)))
    layers = {}
    for backend in ("dense", "auto"):
        torch.manual_seed(0)
        layers[backend] = SelfAttention(H * d, H, pattern, position=position, global_projections=separate,
                                        backend=backend)
    x = torch.randn(B, n, H * d, requires_grad=True)
    outs, grads = {}, {}
    for backend, layer in layers.items():
        outs[backend] = layer(x, key_padding_mask=kpm, global_mask=gm)
        params = [x] + [p for _, p in sorted(layer.named_parameters())]
        grads[backend] = [torch.zeros_like(p) if g is None else g  # unused (e.g. no global token): zero
                          for p, g in zip(params, _grads(outs[backend], params, 1, kpm))]
    rows = torch.ones(1, 1, 1, dtype=torch.bool) if kpm is None else kpm[:, :, None]
    torch.testing.assert_close(torch.where(rows, outs["auto"], 0), torch.where(rows, outs["dense"], 0), **TOL)
    for a, b in zip(grads["auto"], grads["dense"]):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [
    AttentionPattern("sliding", window=5, dilation=(1, 2, 3)),
    AttentionPattern("sliding", window=7, causal=True),
    AttentionPattern("blocks", block=16),
    AttentionPattern("blockwise_causal", block=16),
    AttentionPattern("full"),
])
def test_flex_forward_equals_dense_reference(pattern):
    """FlexAttention with the same predicate as mask_mod (eager on CPU: forward only)."""
    torch.manual_seed(0)
    B, H, n, d = 2, 3, 100, 16
    q, k, v = (torch.randn(B, H, n, d) for _ in range(3))
    kpm = torch.ones(B, n, dtype=torch.bool)
    kpm[0, 80:] = False
    gm = torch.zeros(B, n, dtype=torch.bool)
    gm[0, [0, 33]] = True
    gm[1, 50] = True
    for slopes in (None, torch.rand(H)):
        kw = dict(key_padding_mask=kpm, global_mask=gm, alibi_slopes=slopes)
        with torch.no_grad(), pytest.warns(UserWarning) if False else _nullctx():
            ref = attention(q, k, v, pattern, backend="dense", **kw)
            out = attention(q, k, v, pattern, backend="flex", **kw)
        torch.testing.assert_close(out, ref, **TOL)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_band_covers_predicate_exactly():
    """The blocked kernel's band must contain every pair the predicate allows (else it would drop pairs)."""
    from longctx.attention.patterns import full_mask
    for pattern in [AttentionPattern("sliding", window=w, causal=c) for w in (0, 1, 17, 64) for c in (False, True)] + \
                   [AttentionPattern("blocks", block=b) for b in (1, 7, 32)] + \
                   [AttentionPattern("blockwise_causal", block=b) for b in (1, 7, 32)]:
        n = 301
        c, nL, nR = pattern.band(n)
        m = full_mask(pattern, n)[0, 0]
        i, j = m.nonzero(as_tuple=True)
        chunk = i // c
        assert bool(((j >= (chunk - nL) * c) & (j < (chunk + 1 + nR) * c)).all()), pattern
        # and the exact pair count used for FLOP accounting is right
        assert pattern.attended_pairs(n) == m.sum().item()


def test_global_token_reaches_everything_and_everything_reaches_it():
    torch.manual_seed(0)
    n, d = 200, 8
    pattern = AttentionPattern("sliding", window=3)
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    gm = torch.zeros(1, n, dtype=torch.bool)
    gm[0, 100] = True
    out = attention(q, k, v, pattern, global_mask=gm)
    # far query 0 depends on the global key 100, but not on key 50 (outside its window)
    gv, = torch.autograd.grad(out[0, 0, 0].sum(), v, retain_graph=True)
    assert gv[0, 0, 100].abs().sum() > 0 and gv[0, 0, 50].abs().sum() == 0
    # the global query 100 depends on every key
    gk, = torch.autograd.grad(out[0, 0, 100].sum(), k)
    assert bool((gk[0, 0].abs().sum(-1) > 0).all())
