"""The public entry checks its inputs once, with one sentence, and masked keys contribute nothing,
whatever their values: a NaN reaches exactly the rows the dense reference says can attend it."""
import pytest
import torch

from longctx.attention import AttentionPattern, LayerContext, attention, build
from longctx.errors import LongctxError


def _qkv(B=1, H=2, n=64, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("case,match", [
    ("v_head", "one shape"), ("k_short", "one shape"), ("meta", "one device"), ("batch", "one shape"),
    ("dtype", "one floating dtype"), ("mask", "key_padding_mask must be"), ("slopes", "one per head"),
])
def test_bad_inputs_are_one_sentence(case, match):
    q, k, v = _qkv()
    kw = {}
    if case == "v_head":
        v = torch.randn(1, 2, 64, 4)
    elif case == "k_short":
        k = k[:, :, :10]
    elif case == "meta":
        k = k.to("meta")
    elif case == "batch":
        k = torch.randn(2, 2, 64, 8)
    elif case == "dtype":
        v = v.double()
    elif case == "mask":
        kw["key_padding_mask"] = torch.ones(1, 63, dtype=torch.bool)
    else:
        kw["alibi_slopes"] = torch.ones(3)
    with pytest.raises(LongctxError, match=match) as e:
        attention(q, k, v, AttentionPattern("sliding", window=4), backend="blocked", **kw)
    assert "\n" not in str(e.value)


def _nan_rows(out):  # (B, H, n, d) -> the query rows with a NaN, per batch row
    return out.isnan().any(-1).any(1)


@pytest.mark.parametrize("pattern", [AttentionPattern("sliding", window=4), AttentionPattern("blocks", block=8),
                                     AttentionPattern("sliding", window=3, dilation=(1, 2)),
                                     AttentionPattern("sliding", window=4, causal=True)])
def test_nan_in_a_key_reaches_only_the_rows_that_attend_it(pattern):
    q, k, v = _qkv()
    k[:, :, 30] = float("nan")
    ref = attention(q, k, v, pattern, backend="dense")
    out = attention(q, k, v, pattern, backend="blocked")
    rows = _nan_rows(ref)
    assert 0 < int(rows.sum()) < 20  # the reference: only the neighbours of key 30
    assert torch.equal(_nan_rows(out), rows)
    torch.testing.assert_close(out[~ref.isnan()], ref[~ref.isnan()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["blocked", "dense", "sdpa"])
def test_nan_in_padded_keys_and_values_reaches_no_row(backend):
    q, k, v = _qkv(B=2)
    real = torch.ones(2, 64, dtype=torch.bool)
    real[1, 50:] = False
    k[1, :, 50:] = float("nan")
    v[1, :, 50:] = float("inf")
    pattern = AttentionPattern("full" if backend == "sdpa" else "sliding", window=8)
    glob = torch.zeros(2, 64, dtype=torch.bool)
    glob[:, 3] = True
    gm = None if backend == "sdpa" else glob
    out = attention(q, k, v, pattern, key_padding_mask=real, global_mask=gm, backend=backend)
    assert not out.isnan().any() and not out.isinf().any()
    clean = attention(q, k.nan_to_num(0.0), v.nan_to_num(0.0, 0.0, 0.0), pattern, key_padding_mask=real,
                      global_mask=gm, backend="dense")
    torch.testing.assert_close(out, clean, atol=1e-5, rtol=1e-5)


def test_bigbird_padded_nan_keys_reach_no_row():
    mech = build("bigbird", {"block": 4, "random": 1}, LayerContext(num_heads=2, head_dim=8, max_len=64))
    q, k, v = _qkv(B=2)
    real = torch.ones(2, 64, dtype=torch.bool)
    real[0, 57:] = False
    k[0, :, 57:] = float("nan")
    v[0, :, 57:] = float("nan")
    assert not mech(q, k, v, key_padding=real).isnan().any()
