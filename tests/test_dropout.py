"""The counter-based CPU dropout (longctx.dropout, csrc/dropout.cpp).

Oracles: Random123's known-answer vectors for Philox4x32-10 (its tests/kat_vectors); a NumPy implementation
of the generator and of the element-to-counter map written from the definition in dropout.cpp's header;
exact equality of the vector and scalar paths; and, for the module, autograd's own gradient of x * mask.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longctx import dropout as dropout_mod
from longctx.dropout import Dropout, dropout

pytestmark = pytest.mark.usefixtures("cpp_extension")  # built once (tests/conftest.py)

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter (4 words), key (2), result (4)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
PATHS = [True, False]  # the AVX-512 path (where the build has it; else the scalar one again) and the scalar one


def ops():
    return torch.ops.longctx_dropout


def philox_np(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of counters (m, 4) uint64 holding 32-bit words, from Salmon et al. 2011."""
    mask = np.uint64(0xFFFFFFFF)
    c = [ctr[:, j].astype(np.uint64) for j in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
    return np.stack(c, 1)


def keep_np(n: int, p: float, key: int) -> np.ndarray:
    """Element e's keep decision by the definition: word (e % 64) // 16 of Philox(16 (e // 64) + e % 16)."""
    e = np.arange(n, dtype=np.uint64)
    ctr = np.uint64(16) * (e // np.uint64(64)) + e % np.uint64(16)
    counters = np.stack([ctr & np.uint64(0xFFFFFFFF), ctr >> np.uint64(32), 0 * ctr, 0 * ctr], 1)
    words = philox_np(counters, (key & 0xFFFFFFFF, key >> 32))
    word = words[np.arange(n), ((e % np.uint64(64)) // np.uint64(16)).astype(np.int64)]
    return word >= np.uint64(round(p * 2 ** 32))


@pytest.mark.parametrize("vector", PATHS)
def test_philox_known_answers(vector):
    for ctr, key, want in KAT:
        got = ops().philox(torch.tensor([ctr], dtype=torch.int64), key[0], key[1], vector)
        assert tuple(got[0].tolist()) == want
    # and the NumPy reference the mask test relies on
    for ctr, key, want in KAT:
        assert tuple(int(w) for w in philox_np(np.array([ctr], dtype=np.uint64), key)[0]) == want


@pytest.mark.parametrize("vector", PATHS)
def test_philox_many_counters_match_reference(vector):
    """37 counters (two vectors and a partial third) with arbitrary words, against NumPy."""
    g = torch.Generator().manual_seed(0)
    ctr = torch.randint(0, 2 ** 32, (37, 4), generator=g, dtype=torch.int64)
    key = (0x12345678, 0x9ABCDEF0)
    got = ops().philox(ctr, *key, vector).numpy().astype(np.uint64)
    np.testing.assert_array_equal(got, philox_np(ctr.numpy().astype(np.uint64), key))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_and_scale_match_the_definition(dtype, p):
    n, key = 64 * 40 + 37, (0xDEADBEEF << 31) + 12345  # a partial last block; a key using both words
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    keep = torch.from_numpy(keep_np(n, p, key))
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    want = (x.float() * torch.where(keep, scale, 0.0)).to(dtype)
    for vector in PATHS:
        got = ops().dropout(x, p, key, vector)
        assert got.dtype == dtype
        assert torch.equal(got, want), f"vector={vector}"
    assert abs((~keep).float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_drop_rate_and_pair_independence():
    """Over 4M elements: the drop rate is p, neighbours (same counter, next counter, next block) are
    independent, and another key gives another mask."""
    n, p = 1 << 22, 0.1
    kept = ops().dropout(torch.ones(n), p, 7) != 0
    dropped = (~kept).double()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.mean().item() - p) < 5 * sd
    for lag in (1, 16, 64):  # next counter's same word, same counter's next word, the next block
        both = (dropped[:-lag] * dropped[lag:]).mean().item()
        assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5, lag
    other = ops().dropout(torch.ones(n), p, 8) != 0
    agree = (kept == other).double().mean().item()
    assert abs(agree - ((1 - p) ** 2 + p * p)) < 5 * sd


def test_same_bits_on_any_number_of_threads():
    x = torch.randn(1 << 20).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops().dropout(x, 0.2, 99)
        torch.set_num_threads(max(2, before))
        many = ops().dropout(x, 0.2, 99)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_nan_and_inf_stay_visible_where_dropped():
    """As in ATen: a dropped element is x * 0, so inf and NaN give NaN rather than vanishing."""
    n = 4096
    x = torch.full((n,), float("inf"))
    y = ops().dropout(x, 0.5, 3)
    assert torch.isnan(y).any() and torch.isinf(y).any() and not (y == 0).any()
    yb = ops().dropout(torch.full((n,), float("nan")).bfloat16(), 0.5, 3)
    assert torch.isnan(yb).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_forward_backward(dtype):
    """The gradient is the same mask times the scale (recomputed from the key, nothing stored), on a
    non-contiguous input; eval mode is the identity; the seed repeats the mask."""
    m = Dropout(0.25)
    base = torch.randn(96, 70, generator=torch.Generator().manual_seed(2)).to(dtype)
    x = base.t().requires_grad_()  # non-contiguous
    torch.manual_seed(5)
    y = m(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y.backward(g)
    kept = y.detach() != 0
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    scale = torch.tensor(1 / 0.75)
    assert torch.equal(y.detach(), (x.detach().float() * torch.where(kept, scale, 0.0)).to(dtype))
    assert torch.equal(x.grad, (g.float() * torch.where(kept, scale, 0.0)).to(dtype))
    torch.manual_seed(5)
    assert torch.equal(m(x).detach(), y.detach())
    m.eval()
    assert m(x) is x


def test_double_backward():
    x = torch.randn(300, dtype=torch.float32, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.3)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    kept = (y != 0).float()
    torch.testing.assert_close(ggx, 2 * kept / 0.7 ** 2)


def test_fallbacks_are_aten_dropout(monkeypatch):
    """fp64 and LONGCTX_FUSED=0 run torch's own dropout (the same mask as F.dropout for the seed)."""
    x = torch.randn(1000, dtype=torch.float64)
    torch.manual_seed(4)
    want = F.dropout(x, 0.5)
    torch.manual_seed(4)
    assert torch.equal(dropout(x, 0.5), want)
    assert torch.equal(dropout(torch.ones(5), 1.0), torch.zeros(5))  # as ATen: everything dropped
    with pytest.raises(ValueError):
        dropout(torch.ones(5), 1.5)
    monkeypatch.setenv("LONGCTX_FUSED", "0")
    assert not dropout_mod.available()
    xf = x.float()
    torch.manual_seed(4)
    want = F.dropout(xf, 0.5)
    torch.manual_seed(4)
    assert torch.equal(dropout(xf, 0.5), want)


def test_gradient_checkpointing_recomputes_the_same_masks():
    """The key comes from PyTorch's generator, which checkpointing restores before the recompute: a model
    with dropout gives the same gradients with and without checkpointing."""
    from longctx.models import LongctxConfig, LongctxForMaskedLM

    cfg = LongctxConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, attention={"type": "sliding", "window": 8},
                        max_position_embeddings=128, hidden_dropout_prob=0.3)
    ids = torch.randint(4, 64, (2, 50), generator=torch.Generator().manual_seed(0))

    def grads(checkpoint: bool):
        torch.manual_seed(0)
        model = LongctxForMaskedLM(cfg).train()
        if checkpoint:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(isinstance(m, Dropout) for m in LongctxForMaskedLM(cfg).modules())
