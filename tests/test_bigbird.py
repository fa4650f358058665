"""BigBird: the layout kernel equals the dense reference (outputs and gradients, random shapes, padding,
global tokens), the random layout is seeded and the same in training and evaluation, and with the
layout Hugging Face draws, longctx's BigBird gives Hugging Face's outputs."""
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx.attention import LayerContext, SelfAttention, bigbird, build
from longctx.errors import LongctxError

TOL = dict(atol=1e-5, rtol=1e-5)


def _mech(H, block, random, global_blocks=1, seed=0, layer=0, backend="auto"):
    return build("bigbird", {"block": block, "random": random, "global_blocks": global_blocks},
                 LayerContext(num_heads=H, head_dim=8, max_len=1024, seed=seed, layer_idx=layer, backend=backend))


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
    # query blocks per step of the kernel (None: sized by memory, one step at these lengths)
    with mock.patch.object(bigbird, "GROUP_BLOCKS", data.draw(st.sampled_from([None, 1, 2, 3]))):
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
