"""BigBird: the layout kernel equals the dense reference (outputs and gradients, random shapes, padding,
global tokens), on the PyTorch steps and on the fused C++ tiles (fp32 and bf16, the two paths agree, and
the fused one is bit-identical on one and two threads); the random layout is seeded and the same in
training and evaluation, and with the layout Hugging Face draws, longctx's BigBird gives Hugging Face's
outputs."""
import os
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx.attention import LayerContext, SelfAttention, bigbird, build
from longctx.errors import LongctxError

TOL = dict(atol=1e-5, rtol=1e-5)
# bf16 (as in test_fused.py): unit roundoff u = 2^-8, at most three bf16 roundings per element on terms
# whose absolute sum is a few times the largest result; a wrong mask or statistic is off by O(1)
BF16_REL = 8 * 2.0 ** -8


def _mech(H, block, random, global_blocks=1, seed=0, layer=0, backend="auto", head_dim=8):
    return build("bigbird", {"block": block, "random": random, "global_blocks": global_blocks},
                 LayerContext(num_heads=H, head_dim=head_dim, max_len=1024, seed=seed, layer_idx=layer,
                              backend=backend))


def _no_fused():  # the PyTorch steps, whatever the extension's state (the dispatcher's policy: never)
    return mock.patch.dict(os.environ, {"LONGCTX_FUSED": "0"})


@settings(max_examples=60)
@given(data=st.data())
def test_layout_kernel_equals_dense_reference(data):
    B, H = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    d = data.draw(st.sampled_from([4, 8, 16]))
    n = data.draw(st.integers(1, 300))
    block, random = data.draw(st.integers(1, 24)), data.draw(st.integers(0, 4))
    mech = _mech(H, block, random, global_blocks=data.draw(st.integers(0, 2)), seed=data.draw(st.integers(0, 9)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    kpm = None if data.draw(st.booleans()) else torch.rand(B, n, generator=g) < 0.8
    gm = None if data.draw(st.booleans()) else torch.rand(B, n, generator=g) < 0.05
    q, k, v = (torch.randn(B, H, n, d, generator=g).requires_grad_() for _ in range(3))
    # the oracle in float64 on the same inputs: only the kernel's fp32 rounding is measured
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = mech.reference(q64, k64, v64, key_padding=kpm, global_mask=gm)
    # query blocks per step of the kernel (None: sized by memory, one step at these lengths); the PyTorch
    # steps (the fused tiles: test_fused_layout_equals_dense_reference)
    with mock.patch.object(bigbird, "GROUP_BLOCKS", data.draw(st.sampled_from([None, 1, 2, 3]))), \
            _no_fused():
        out = mech(q, k, v, key_padding=kpm, global_mask=gm)
    rows = torch.ones(1, 1, n, 1, dtype=torch.bool) if kpm is None else kpm[:, None, :, None]
    torch.testing.assert_close(torch.where(rows, out, 0), torch.where(rows, ref.float(), 0), **TOL)
    up = torch.randn(out.shape, generator=g) * rows
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up),
                    torch.autograd.grad(ref, (q64, k64, v64), up.double())):
        torch.testing.assert_close(a, b.float(), **TOL)


def test_layout_is_seeded_the_same_in_train_and_eval_and_never_repeats_a_block():
    layer = SelfAttention(16, 2, {"type": "bigbird", "block": 4, "random": 2}, layer_idx=3, seed=7)
    x = torch.randn(2, 64, 16)
    layer.train()
    a = layer(x)
    layer.eval()
    torch.testing.assert_close(layer(x), a)  # no dropout in the layer here: the same function
    again = SelfAttention(16, 2, {"type": "bigbird", "block": 4, "random": 2}, layer_idx=3, seed=7)
    assert torch.equal(again.mechanism.layout(64), layer.mechanism.layout(64))
    other = SelfAttention(16, 2, {"type": "bigbird", "block": 4, "random": 2}, layer_idx=4, seed=7)
    assert not torch.equal(other.mechanism.layout(64), layer.mechanism.layout(64))
    R = layer.mechanism.layout(64)  # (H, 16, 16): 3 sliding + 2 random per non-global query block
    i = torch.arange(16)
    rand = R & ((i[:, None] - i[None, :]).abs() > 1)  # the random blocks alone
    assert R[:, 1:-1].sum(-1).eq(5).all() and rand[:, 1:-1].sum(-1).eq(2).all()
    assert rand[:, :, 0].sum() == 0 and rand[:, :, -1].sum() == 0  # never a global block


def test_bigbird_is_encoder_only_and_takes_no_bias():
    with pytest.raises(LongctxError, match="no causal form"):
        SelfAttention(16, 2, {"type": "bigbird", "block": 4}, causal=True)
    with pytest.raises(LongctxError, match="no score bias"):
        SelfAttention(16, 2, {"type": "bigbird", "block": 4}, position="alibi")(torch.randn(1, 8, 16))


def test_equals_hugging_face_block_sparse_attention_with_its_training_layout():
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

    hidden, H, block, r, B, n = 32, 2, 4, 2, 2, 64
    cfg = BigBirdConfig(hidden_size=hidden, num_attention_heads=H, block_size=block, num_random_blocks=r,
                        attention_type="block_sparse", max_position_embeddings=128, use_bias=True)
    torch.manual_seed(0)
    hf = BigBirdBlockSparseAttention(cfg, seed=3).train()  # training mode: HF draws random blocks
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    drawn = []
    draw = hf._bigbird_block_rand_mask_with_head
    hf._bigbird_block_rand_mask_with_head = lambda *a, **kw: drawn.append(draw(*a, **kw)) or drawn[-1]

    real = torch.ones(B, n)
    real[1, n - 7:] = 0
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(real, block)
    x = torch.randn(B, n, hidden)
    np.random.seed(0)
    with torch.no_grad():
        ref = hf(x, band, from_mask, to_mask, blocked, blocked)[0]
    layout = np.stack(drawn[0])  # (H, nb - 2, r): random key blocks of query blocks 1 .. nb - 2
    assert layout.any(), "HF drew no random blocks (eval mode?)"

    ours = SelfAttention(hidden, H, {"type": "bigbird", "block": block, "random": r})
    ours.mechanism.set_random_blocks(n, layout)
    with torch.no_grad():
        for name in ("query", "key", "value"):
            getattr(ours, name).weight.copy_(getattr(hf, name).weight)
            getattr(ours, name).bias.copy_(getattr(hf, name).bias)
        ours.out.weight.copy_(torch.eye(hidden))  # HF's module stops before the output projection
        ours.out.bias.zero_()
        out = ours(x, key_padding_mask=real.bool())
    keep = real.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-4, rtol=1e-4)
    # and the random blocks matter: the seeded layout of our own gives other outputs
    ours.mechanism._layouts.clear()
    with torch.no_grad():
        assert (ours(x, key_padding_mask=real.bool())[keep] - ref[keep]).abs().max() > 1e-2


def _layout_case(data, dtype=torch.float32):
    """A random BigBird case: shapes with n not always a multiple of the block, random key padding and
    global tokens, inputs in (B, H, n, d) or in the layer's (B, n, H, d) memory."""
    B, H = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    d = data.draw(st.sampled_from([4, 8, 16, 64]))
    n = data.draw(st.integers(1, 300))
    block, random = data.draw(st.integers(1, 24)), data.draw(st.integers(0, 4))
    mech = _mech(H, block, random, global_blocks=data.draw(st.integers(0, 2)), seed=data.draw(st.integers(0, 9)),
                 head_dim=d)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    kpm = None if data.draw(st.booleans()) else torch.rand(B, n, generator=g) < 0.8
    gm = None if data.draw(st.booleans()) else torch.rand(B, n, generator=g) < 0.05
    seq_major = data.draw(st.booleans())

    def tensor():
        if seq_major:
            return torch.randn(B, n, H, d, generator=g).to(dtype).transpose(1, 2).requires_grad_()
        return torch.randn(B, H, n, d, generator=g).to(dtype).requires_grad_()

    q, k, v = tensor(), tensor(), tensor()
    rows = torch.ones(1, 1, n, 1, dtype=torch.bool) if kpm is None else kpm[:, None, :, None]
    up = (torch.randn(B, H, n, d, generator=g) * rows).to(dtype)
    return mech, (q, k, v), dict(key_padding=kpm, global_mask=gm), rows, up


def _fused_run(mech, inputs, kw, up):
    """Output and (q, k, v) gradients on the fused tiles (the PyTorch steps may not run)."""
    with mock.patch.object(bigbird._LayoutSteps, "apply", side_effect=AssertionError("PyTorch steps ran")):
        out = mech(*inputs, **kw)
    return out, torch.autograd.grad(out, inputs, up)


def _reference(mech, inputs, kw, up):
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = mech.reference(*x64, **kw)
    return ref, torch.autograd.grad(ref, x64, up.double())


@pytest.mark.usefixtures("cpp_extension")
@settings(max_examples=80)
@given(data=st.data())
def test_fused_layout_equals_dense_reference(data):
    mech, inputs, kw, rows, up = _layout_case(data)
    out, grads = _fused_run(mech, inputs, kw, up)
    ref, ref_grads = _reference(mech, inputs, kw, up)
    torch.testing.assert_close(torch.where(rows, out, 0), torch.where(rows, ref.float(), 0), **TOL)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b.float(), **TOL, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.usefixtures("cpp_extension")
@pytest.mark.parametrize("path", ["own", "mkl"])
@settings(max_examples=40)
@given(data=st.data())
def test_fused_layout_bf16_within_bf16_precision(path, monkeypatch, data):
    """bf16 operands, fp32 softmax statistics and accumulation: within 8u of the largest reference value
    (plus fp32's cancellation floor in dS = P (dP - D), as in test_fused.py); the products on the
    kernel's AVX512-BF16 micro-kernel ("own", where built) and on MKL (LONGCTX_FUSED_GEMM=mkl)."""
    if path == "mkl":
        monkeypatch.setenv("LONGCTX_FUSED_GEMM", "mkl")
    else:
        monkeypatch.delenv("LONGCTX_FUSED_GEMM", raising=False)
    mech, inputs, kw, rows, up = _layout_case(data, torch.bfloat16)
    out, grads = _fused_run(mech, inputs, kw, up)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    ref, ref_grads = _reference(mech, inputs, kw, up)
    d = inputs[0].shape[-1]
    amax = max(t.detach().abs().max().item() for t in inputs)
    floor = 1e-6 + 2.0 ** -24 * d * up.abs().max().item() * amax * amax
    for name, a, b in [("out", torch.where(rows, out, 0), torch.where(rows, ref, 0))] + list(zip("qkv", grads, ref_grads)):
        err, scale = (a.double() - b).abs().max().item(), b.abs().max().item()
        assert err <= BF16_REL * scale + floor, f"{name}: error {err:.3g} > {BF16_REL:.3g} x {scale:.3g} + {floor:.3g}"


@pytest.mark.usefixtures("cpp_extension")
@pytest.mark.parametrize("B, H, n, d, block, random, global_blocks", [
    (2, 3, 250, 16, 16, 3, 1), (1, 2, 203, 8, 7, 2, 2), (3, 1, 64, 64, 64, 0, 0), (2, 2, 90, 32, 10, 4, 0)])
def test_fused_layout_agrees_with_pytorch_steps(B, H, n, d, block, random, global_blocks):
    """The automatic choice: fp32 on the fused tiles, the same inputs on the PyTorch steps (with
    LONGCTX_FUSED=0) give the same outputs and gradients; float64 runs the PyTorch steps by itself."""
    mech = _mech(H, block, random, global_blocks, seed=4, head_dim=d)
    g = torch.Generator().manual_seed(n)
    inputs = [torch.randn(B, H, n, d, generator=g).requires_grad_() for _ in range(3)]
    kw = dict(key_padding=torch.rand(B, n, generator=g) < 0.85, global_mask=torch.rand(B, n, generator=g) < 0.03)
    rows = kw["key_padding"][:, None, :, None]
    up = torch.randn(B, H, n, d, generator=g) * rows
    out, grads = _fused_run(mech, inputs, kw, up)
    with _no_fused():
        out2 = mech(*inputs, **kw)
        grads2 = torch.autograd.grad(out2, inputs, up)
    torch.testing.assert_close(torch.where(rows, out, 0), torch.where(rows, out2, 0), **TOL)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, **TOL)
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    with mock.patch.object(torch.ops.longctx_fused, "layout_forward", side_effect=AssertionError("fused on fp64")):
        out64 = mech(*x64, **kw)
    torch.testing.assert_close(torch.where(rows, out64, 0), torch.where(rows, out2.double(), 0), **TOL)


@pytest.mark.usefixtures("cpp_extension")
def test_fused_layout_bit_identical_on_one_and_two_threads():
    """Forward tiles are independent of their task; backward accumulates dK, dV per (batch, head) in query
    block order: the kernel's outputs are the same bits whatever the thread count (B H = 2 < 4 tasks per
    thread in forward, so the forward's task split differs between the runs). The kernel's own ops are
    compared: the global rows around it (_global_rows, PyTorch matmuls over n) may round differently
    when MKL splits their sums over threads."""
    g = torch.Generator().manual_seed(2)
    B, H, n, d = 1, 2, 1000, 32
    mech = _mech(H, 32, 3, 1, seed=1, head_dim=d)
    inputs = [torch.randn(B, n, H, d, generator=g).transpose(1, 2).requires_grad_() for _ in range(3)]
    kw = dict(key_padding=torch.rand(B, n, generator=g) < 0.9, global_mask=torch.rand(B, n, generator=g) < 0.01)
    up = torch.randn(B, H, n, d, generator=g)
    calls, apply = [], bigbird._FusedLayout.apply
    with mock.patch.object(bigbird._FusedLayout, "apply", side_effect=lambda *a: calls.append(a) or apply(*a)):
        out, grads = _fused_run(mech, inputs, kw, up)
    ref, ref_grads = _reference(mech, inputs, kw, up)
    rows = kw["key_padding"][:, None, :, None]
    torch.testing.assert_close(torch.where(rows, out, 0), torch.where(rows, ref.float(), 0), **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b.float(), **TOL)
    q, k, v, kg, vg, layout = calls[0]
    q, k, v, kg, vg = (x.detach() for x in (q, k, v, kg, vg))
    masks = layout.kernel_masks()
    assert kg.shape[2] > 0 and not masks[2].bool().all()  # global keys and padded band keys both present
    dout = torch.randn(q.shape, generator=g)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            o, lse = torch.ops.longctx_fused.layout_forward(q, k, v, kg, vg, *masks)
            runs.append([o, lse, *torch.ops.longctx_fused.layout_backward(q, k, v, kg, vg, o, dout, lse, *masks)])
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dkg", "dvg"], *runs):
        assert torch.equal(a, b), name
