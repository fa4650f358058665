"""The approximate attention families (Linformer, Performer, Nystromformer, LSH) against their oracles.

Each family is held to (1) its peers' code installed from PyPI (the ``linformer`` and ``performer-pytorch``
packages, Hugging Face's Nystromformer and Reformer layers) with the same weights and the same random
draws, within 1e-4; (2) the method's exact limit (full softmax attention); (3) its own readable
``reference`` on outputs and gradients (fp64, 1e-5) for random shapes and padding, and its
``attention_map`` (A @ v == forward).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longctx.attention  # noqa: F401  (registers the families)
from longctx.attention.mechanism import MECHANISMS, LayerContext, build, make_spec
from longctx.errors import LongctxError

TOL = dict(atol=1e-5, rtol=1e-5)
PEER = dict(atol=1e-4, rtol=1e-4)


def dense_softmax(q, k, v, key_padding=None, causal=False):
    """Plain softmax attention: the exact limit every approximation is held to."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = q.shape[-2]
    if key_padding is not None:
        s = s.masked_fill(~key_padding[:, None, None, :], float("-inf"))
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def _qkv(B, H, n, d, seed, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(B, H, n, d, generator=g, dtype=dtype)).requires_grad_() for _ in range(3)]


def _padding(B, n, mode, seed):
    """(B, n) bool, True = real token; at least one real token per row."""
    if mode == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    if mode == "right":
        lengths = torch.randint(1, n + 1, (B,), generator=g)
        return torch.arange(n)[None, :] < lengths[:, None]
    kp = torch.rand(B, n, generator=g) < 0.8
    kp[:, 0] = True
    return kp


def _grads(out, inputs, seed):
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, up, allow_unused=True)


def check_against_reference(mech, q, k, v, key_padding, seed, map_too=True, inputs=None):
    """forward == reference on outputs and on gradients of q, k, v and the mechanism's parameters, and
    attention_map @ v == forward."""
    inputs = [q, k, v] + [p for p in mech.parameters() if p.requires_grad] if inputs is None else inputs
    out = mech(q, k, v, key_padding=key_padding)
    ref = mech.reference(q, k, v, key_padding=key_padding)
    assert out.shape == q.shape[:-1] + v.shape[-1:]
    torch.testing.assert_close(out, ref, **TOL)
    for a, b, x in zip(_grads(out, inputs, seed), _grads(ref, inputs, seed), inputs):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        torch.testing.assert_close(a, b, **TOL)
    if map_too:
        with torch.no_grad():
            A = mech.attention_map(q, k, v, key_padding=key_padding)
            torch.testing.assert_close(A @ v, out.detach(), **TOL)


def ctx(H=2, d=8, max_len=64, causal=False, layer_idx=0, seed=0):
    return LayerContext(num_heads=H, head_dim=d, max_len=max_len, causal=causal, layer_idx=layer_idx, seed=seed)


def test_every_family_is_registered():
    assert {"linformer", "performer", "nystrom", "lsh"} <= set(MECHANISMS)


# -- Linformer ----------------------------------------------------------------------------------------------
def _linformer_peer_parity(share_kv: bool):
    from linformer import LinformerSelfAttention
    torch.manual_seed(0)
    D, H, L, K, n = 32, 4, 64, 16, 50  # n < max_len: the first n rows of E and F are used
    peer = LinformerSelfAttention(dim=D, seq_len=L, k=K, heads=H, share_kv=share_kv).eval()
    mech = build("linformer", {"k": K, "share": "kv" if share_kv else "headwise"}, ctx(H, D // H, L))
    with torch.no_grad():
        mech.E.copy_(peer.proj_k)
        if not share_kv:
            mech.F.copy_(peer.proj_v)
    x = torch.randn(2, n, D)
    split = lambda t: t.view(2, n, H, D // H).transpose(1, 2)  # noqa: E731  (B, H, n, d)
    q, k = split(peer.to_q(x)), split(peer.to_k(x))
    v = k if share_kv else split(peer.to_v(x))
    ours = peer.to_out(mech(q, k, v).transpose(1, 2).reshape(2, n, D))
    torch.testing.assert_close(ours, peer(x), **PEER)


@pytest.mark.parametrize("share_kv", [False, True])
def test_linformer_equals_linformer_package(share_kv):
    _linformer_peer_parity(share_kv)


def test_linformer_with_identity_projection_is_full_attention():
    n = 40
    mech = build("linformer", {"k": n, "share": "none"}, ctx(2, 8, n))
    with torch.no_grad():
        mech.E.copy_(torch.eye(n).expand(2, n, n))
        mech.F.copy_(torch.eye(n).expand(2, n, n))
    q, k, v = (t.detach().float() for t in _qkv(2, 2, n, 8, 1))
    torch.testing.assert_close(mech(q, k, v), dense_softmax(q, k, v), **TOL)


def test_linformer_padding_never_reaches_the_projection():
    mech = build("linformer", {"k": 8}, ctx(2, 8, 32)).double()
    q, k, v = (t.detach() for t in _qkv(1, 2, 20, 8, 2))
    kp = torch.arange(20)[None] < 15
    out = mech(q, k, v, key_padding=kp)
    k2, v2 = k.clone(), v.clone()
    k2[..., 15:, :], v2[..., 15:, :] = 1e3, -1e3
    torch.testing.assert_close(mech(q, k2, v2, key_padding=kp), out, **TOL)


def test_linformer_layerwise_sharing_is_one_parameter():
    from torch import nn
    layers = nn.ModuleList(build("linformer", {"k": 8, "share": "layer"}, ctx(2, 8, 32, layer_idx=i, seed=5))
                           for i in range(3))
    assert len(list(layers.parameters())) == 1 and list(layers.state_dict()) == ["0.E"]
    assert all(m.projections(20)[0].data_ptr() == layers[0].E.data_ptr() for m in layers)
    with torch.no_grad():
        layers[0].E.add_(1.0)  # training layer 0's E moves every layer's
    assert torch.equal(layers[2].projections(32)[0], layers[0].E)


def test_linformer_errors_are_one_sentence():
    with pytest.raises(LongctxError, match="k must be a positive integer"):
        make_spec("linformer", {"k": 0})
    with pytest.raises(LongctxError, match="share must be one of"):
        make_spec("linformer", {"share": "heads"})
    with pytest.raises(LongctxError, match="no causal form"):
        build("linformer", {}, ctx(causal=True))
    mech = build("linformer", {"k": 4}, ctx(1, 8, 16))
    with pytest.raises(LongctxError, match="max_len = 16"):
        mech(*(torch.randn(1, 1, 17, 8) for _ in range(3)))


@settings(max_examples=30)
@given(data=st.data())
def test_linformer_forward_equals_reference(data):
    B, H, n, d = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 70)), \
        data.draw(st.sampled_from([4, 8, 16]))
    share = data.draw(st.sampled_from(["none", "headwise", "kv"]))
    mech = build("linformer", {"k": data.draw(st.integers(1, 40)), "share": share}, ctx(H, d, 80)).double()
    seed = data.draw(st.integers(0, 2**31))
    check_against_reference(mech, *_qkv(B, H, n, d, seed), _padding(B, n, data.draw(st.sampled_from(
        ["none", "right", "random"])), seed), seed)


# -- Nystromformer ------------------------------------------------------------------------------------------
def _hf_nystrom(D, H, m, n, K):
    from transformers import NystromformerConfig
    from transformers.models.nystromformer.modeling_nystromformer import NystromformerSelfAttention
    cfg = NystromformerConfig(hidden_size=D, num_attention_heads=H, num_landmarks=m, segment_means_seq_len=n,
                              conv_kernel_size=K, attention_probs_dropout_prob=0.0)
    return NystromformerSelfAttention(cfg).eval()


@pytest.mark.parametrize("pinv_init,landmarks", [("original", 8), ("per_head", 8), ("original", 64)])
def test_nystrom_equals_hugging_face(pinv_init, landmarks):
    """Hugging Face's layer with copied weights, padding included. Its padding masks only the landmark
    rows' scores and keeps padded vectors in the landmark means, so the padded tokens are given zero
    hidden states and the projections no bias: then its padded q, k, v are zero, as ours are."""
    torch.manual_seed(0)
    B, D, H, n, K = 2, 32, 4, 64, 5
    peer = _hf_nystrom(D, H, landmarks, n, K)
    if pinv_init == "per_head":
        peer.init_option = "exact"  # HF's per-(sequence, head) start (its config key cannot reach it)
    with torch.no_grad():
        for lin in (peer.query, peer.key, peer.value):
            lin.bias.zero_()
    mech = build("nystrom", {"num_landmarks": landmarks, "conv_kernel_size": K, "pinv_init": pinv_init},
                 ctx(H, D // H, n))
    with torch.no_grad():
        mech.conv.weight.copy_(peer.conv.weight)
    kp = torch.ones(B, n, dtype=torch.bool)
    kp[1, 45:] = False
    x = torch.randn(B, n, D) * kp[..., None]
    ext = (1.0 - kp[:, None, None, :].float()) * torch.finfo(torch.float32).min
    theirs = peer(x, attention_mask=ext)[0]
    split = lambda t: t.view(B, n, H, D // H).transpose(1, 2)  # noqa: E731
    ours = mech(split(peer.query(x)), split(peer.key(x)), split(peer.value(x)), key_padding=kp)
    ours = ours.transpose(1, 2).reshape(B, n, D)
    torch.testing.assert_close(ours[kp], theirs[kp], **PEER)


def test_nystrom_with_a_landmark_per_token_is_full_attention():
    """Through the landmark path itself (not the m >= n shortcut): m = n segments of one token each, the
    pseudo-inverse iterated to convergence, so the Nystrom matrix A A^+ A is A."""
    n = 24
    mech = build("nystrom", {"num_landmarks": n, "conv_kernel_size": 0, "pinv_iterations": 40}, ctx(2, 8, n)).double()
    q, k, v = (t.detach() for t in _qkv(2, 2, n, 8, 3))
    q, k = 2 * q, 2 * k  # peaked scores: a well-conditioned softmax matrix
    torch.testing.assert_close(mech.landmark_matrix(q, k) @ v, dense_softmax(q, k, v), **TOL)
    # and the m >= n shortcut, padding included
    kp = _padding(2, n, "random", 4)
    torch.testing.assert_close(mech(q, k, v, key_padding=kp)[kp[:, None].expand(2, 2, n)],
                               dense_softmax(q, k, v, kp)[kp[:, None].expand(2, 2, n)], **TOL)


def test_nystrom_errors_are_one_sentence():
    with pytest.raises(LongctxError, match="odd"):
        make_spec("nystrom", {"conv_kernel_size": 4})
    with pytest.raises(LongctxError, match="num_landmarks"):
        make_spec("nystrom", {"num_landmarks": 0})
    with pytest.raises(LongctxError, match="pinv_init"):
        make_spec("nystrom", {"pinv_init": "fast"})


@settings(max_examples=30)
@given(data=st.data())
def test_nystrom_forward_equals_reference(data):
    B, H, n, d = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 90)), \
        data.draw(st.sampled_from([4, 8, 16]))
    spec = {"num_landmarks": data.draw(st.integers(1, 24)), "conv_kernel_size": data.draw(st.sampled_from([0, 3, 7])),
            "pinv_init": data.draw(st.sampled_from(["per_head", "original"]))}
    mech = build("nystrom", spec, ctx(H, d, 128)).double()
    seed = data.draw(st.integers(0, 2**31))
    check_against_reference(mech, *_qkv(B, H, n, d, seed), _padding(B, n, data.draw(st.sampled_from(
        ["none", "right", "random"])), seed), seed)


# -- Performer ----------------------------------------------------------------------------------------------
def test_performer_equals_performer_pytorch():
    from performer_pytorch import FastAttention
    torch.manual_seed(0)
    B, H, n, d, m = 2, 3, 77, 16, 48
    peer = FastAttention(dim_heads=d, nb_features=m)
    mech = build("performer", {"nb_features": m}, ctx(H, d, 128)).eval()
    mech.projection.copy_(peer.projection_matrix)
    q, k, v = (torch.randn(B, H, n, d) for _ in range(3))
    torch.testing.assert_close(mech(q, k, v), peer(q, k, v), **PEER)


def test_performer_features_are_orthogonal_gaussian_and_seeded():
    from longctx.attention.performer import orthogonal_gaussian
    W = orthogonal_gaussian(40, 16, torch.Generator().manual_seed(0))
    U = W / W.norm(dim=1, keepdim=True)
    torch.testing.assert_close(U[:16] @ U[:16].T, torch.eye(16), atol=1e-5, rtol=0)  # one block: orthonormal
    a, b = (build("performer", {"nb_features": 40}, ctx(2, 16, 64, seed=3)) for _ in range(2))
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, build("performer", {"nb_features": 40}, ctx(2, 16, 64, seed=4)).projection)


def test_performer_redraws_every_interval_in_training_only():
    mech = build("performer", {"nb_features": 8, "redraw_interval": 3}, ctx(1, 8, 16))
    twin = build("performer", {"nb_features": 8, "redraw_interval": 3}, ctx(1, 8, 16))
    x = torch.randn(1, 1, 5, 8)
    seen = [mech.projection.clone()]
    for _ in range(6):
        mech(x, x, x)
        seen.append(mech.projection.clone())
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert changed == [False, False, True, False, False, True]
    for _ in range(6):
        twin(x, x, x)
    assert torch.equal(twin.projection, mech.projection)  # same seed, same draws
    mech.eval()
    for _ in range(6):
        mech(x, x, x)
    assert torch.equal(mech.projection, seen[-1])


def test_performer_error_against_softmax_falls_with_features():
    """The measured curve: mean absolute error against exact softmax attention over 6 seeds, for 16, 64,
    256, 1,024 features, bidirectional and causal. FAVOR+'s error shrinks as 1/sqrt(m)."""
    n, d = 64, 16
    for causal in (False, True):
        curve = []
        for m in (16, 64, 256, 1024):
            errs = []
            for seed in range(6):
                mech = build("performer", {"nb_features": m}, ctx(2, d, n, causal=causal, seed=seed)).eval()
                q, k, v = (0.5 * t.detach().float() for t in _qkv(2, 2, n, d, 100 + seed))
                errs.append((mech(q, k, v) - dense_softmax(q, k, v, causal=causal)).abs().mean())
            curve.append(float(torch.stack(errs).mean()))
        assert all(b < a for a, b in zip(curve, curve[1:])), (causal, curve)
        assert curve[-1] < curve[0] / 4, (causal, curve)  # 64x the features: about 8x less error


def test_performer_cache_generates_like_the_full_causal_forward():
    B, H, n, d = 2, 2, 150, 8
    mech = build("performer", {"nb_features": 32, "chunk": 16}, ctx(H, d, 256, causal=True)).double().eval()
    q, k, v = (t.detach() for t in _qkv(B, H, n, d, 7))
    kp = torch.ones(B, n, dtype=torch.bool)
    kp[1, :3] = False  # left padding, as in batched generation
    full = mech(q, k, v, key_padding=kp)
    from longctx.attention.performer import PerformerCache
    cache = PerformerCache()
    steps = [mech(q[..., :100, :], k[..., :100, :], v[..., :100, :], key_padding=kp[:, :100], cache=cache)]
    state_size = cache.S.numel()
    for i in range(100, n):
        steps.append(mech(q[..., i:i + 1, :], k[..., i:i + 1, :], v[..., i:i + 1, :], key_padding=kp[:, i:i + 1],
                          cache=cache))
    assert cache.length == n and cache.S.numel() == state_size  # constant size
    torch.testing.assert_close(torch.cat(steps, dim=-2), full, **TOL)


@settings(max_examples=30)
@given(data=st.data())
def test_performer_forward_equals_reference(data):
    B, H, n, d = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 90)), \
        data.draw(st.sampled_from([4, 8, 16]))
    causal = data.draw(st.booleans())
    spec = {"nb_features": data.draw(st.integers(1, 40)), "chunk": data.draw(st.integers(1, 40))}
    mech = build("performer", spec, ctx(H, d, 128, causal=causal)).double()
    seed = data.draw(st.integers(0, 2**31))
    check_against_reference(mech, *_qkv(B, H, n, d, seed), _padding(B, n, data.draw(st.sampled_from(
        ["none", "right", "random"])), seed), seed)


# -- LSH (Reformer) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,padded,n_hashes", [(False, False, 1), (False, True, 2), (True, False, 2),
                                                    (True, True, 3)])
def test_lsh_equals_hugging_face_reformer(causal, padded, n_hashes):
    """Hugging Face's LSHSelfAttention (shared query_key projection) with the same rotations: its
    hash_seed draws them with torch.randn after torch.manual_seed, so the same call fills ours. In float64:
    a token that sees only itself has scores near -1e5, where fp32's spacing (0.008) makes either
    implementation's fp32 result off by up to 1% depending on the order of operations."""
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention
    B, D, H, n, C, nb, seed = 2, 32, 2, 96, 16, 8, 3
    cfg = ReformerConfig(hidden_size=D, num_attention_heads=H, attention_head_size=D // H, lsh_attn_chunk_length=C,
                         num_buckets=nb, num_hashes=n_hashes, hash_seed=seed, lsh_num_chunks_before=1,
                         lsh_num_chunks_after=0, is_decoder=causal, max_position_embeddings=256,
                         lsh_attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    peer = LSHSelfAttention(cfg, layer_idx=0).eval().double()
    mech = build("lsh", {"chunk_length": C, "num_buckets": nb, "n_hashes": n_hashes},
                 ctx(H, D // H, 256, causal=causal)).eval().double()
    torch.manual_seed(seed)
    mech.rotations.copy_(torch.randn(H, D // H, n_hashes, nb // 2, dtype=torch.float64))
    x = torch.randn(B, n, D, dtype=torch.float64)
    kp = torch.ones(B, n, dtype=torch.bool)
    if padded:
        kp[1, 70:] = False
    theirs = peer(x, attention_mask=kp.long() if padded else None).hidden_states
    split = lambda t: t.view(B, n, H, D // H).transpose(1, 2)  # noqa: E731
    qk = split(peer.query_key(x))
    ours = mech(qk, qk, split(peer.value(x)), key_padding=kp if padded else None).transpose(1, 2).reshape(B, n, D)
    torch.testing.assert_close(ours[kp], theirs[kp], **PEER)


def test_lsh_attends_to_self_only_when_nothing_else_is_visible():
    mech = build("lsh", {"chunk_length": 4, "num_buckets": 4}, ctx(1, 8, 32, causal=True)).double()
    q, _, v = (t.detach() for t in _qkv(1, 1, 12, 8, 5))
    A = mech.attention_map(q, q, v)[0, 0]
    seen = mech.visit_counts(q, torch.ones(1, 12, dtype=torch.bool))[0, 0] > 0
    others = (seen & ~torch.eye(12, dtype=torch.bool)).tril().any(dim=1)  # an earlier key in a visited chunk
    assert 0 < int(others.sum()) < 12                                    # both cases occur here
    assert bool((A.diagonal()[others] < 1e-30).all())                   # never itself when anything else is seen
    assert bool((A.diagonal()[~others] == 1.0).all())                   # itself when nothing else is
    assert float(A.triu(1).abs().max()) == 0.0                          # causal


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_single_token_returns_its_value_in_fp32(causal):
    """A token alone sees only itself: its output is v, exactly (not 0.9978 v from exp(s - logsumexp) with
    both near the self value -1e5, where fp32's spacing is 2^-7)."""
    mech = build("lsh", {}, ctx(2, 8, 32, causal=causal))
    q, v = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8)
    torch.testing.assert_close(mech(q, q, v), v, atol=1e-6, rtol=1e-6)


def test_lsh_fp32_equals_fp64_reference_when_tokens_see_only_themselves():
    """Causal with two rounds: early tokens see only themselves, several times in a round (up to 5e-3 off
    before); fp32 on the fp64 reference's inputs is within fp32 rounding."""
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(1, 40, (1,), generator=g))
        mech = build("lsh", {"chunk_length": 4, "num_buckets": 4, "n_hashes": 2},
                     ctx(2, 8, 64, causal=True, seed=seed)).double()
        q, v = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(2))
        ref = mech.reference(q, q, v)
        out = mech.float()(q.float(), q.float(), v.float())
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed {seed}: {m}")


def test_lsh_errors_are_one_sentence():
    with pytest.raises(LongctxError, match="even"):
        make_spec("lsh", {"num_buckets": 7})
    with pytest.raises(LongctxError, match="chunk_length"):
        make_spec("lsh", {"chunk_length": 0})


@settings(max_examples=30)
@given(data=st.data())
def test_lsh_forward_equals_reference(data):
    B, H, n, d = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 90)), \
        data.draw(st.sampled_from([4, 8, 16]))
    spec = {"chunk_length": data.draw(st.integers(1, 24)), "num_buckets": data.draw(st.sampled_from([2, 4, 8])),
            "n_hashes": data.draw(st.integers(1, 3)), "chunks_before": data.draw(st.integers(0, 2)),
            "chunks_after": data.draw(st.integers(0, 1))}
    mech = build("lsh", spec, ctx(H, d, 128, causal=data.draw(st.booleans()))).double()
    seed = data.draw(st.integers(0, 2**31))
    q, k, v = _qkv(B, H, n, d, seed)
    check_against_reference(mech, q, q, v, _padding(B, n, data.draw(st.sampled_from(["none", "right", "random"])),
                                                    seed), seed, inputs=[q, v])


@settings(max_examples=15)
@given(data=st.data())
def test_lsh_fast_path_in_groups_of_any_size_equals_reference(data):
    """The fast path attends STEP / (B H) chunks at a time (recomputed in backward) and takes the heads in
    blocks of BLOCK_TOKENS rows: any step and block size, a last group shorter than the rest and blocks
    of one head included, gives the reference's outputs and gradients."""
    from unittest import mock

    import longctx.attention.lsh as lsh
    B, H, n, d = 1, 2, data.draw(st.integers(8, 70)), 8
    spec = {"chunk_length": data.draw(st.integers(2, 8)), "num_buckets": 4, "n_hashes": data.draw(st.integers(1, 2))}
    mech = build("lsh", spec, ctx(H, d, 128, causal=data.draw(st.booleans()))).double()
    seed = data.draw(st.integers(0, 2**31))
    q, k, v = _qkv(B, H, n, d, seed)
    block = data.draw(st.sampled_from([1, 10**6]))  # one head per block, or both at once
    with mock.patch.object(lsh, "STEP", data.draw(st.integers(1, 10))), mock.patch.object(lsh, "BLOCK_TOKENS", block):
        check_against_reference(mech, q, q, v, _padding(B, n, "right", seed), seed, inputs=[q, v], map_too=False)


# -- the benchmark's family cases ---------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["longctx-linformer", "longctx-performer", "longctx-nystrom", "longctx-lsh",
                                  "longctx-bigbird"])
def test_bench_builds_every_family(impl):
    """The layer `longctx bench attention` times: runs forward and backward at a tiny size, and counts the
    mechanism's own FLOPs (smoke test only; the timing is the benchmark's job)."""
    from longctx.bench.attention import DEFAULTS, build as bench_build, useful_flops
    cfg = dict(DEFAULTS, hidden=32, heads=2)
    module, inputs, fn = bench_build(impl, 300, cfg, torch.float32)
    fn(*inputs).sum().backward()
    assert inputs[0].grad is not None and inputs[0].grad.abs().sum() > 0
    fwd, train = useful_flops(impl, 300, cfg)
    assert 0 < fwd < train
