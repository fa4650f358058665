"""The fused cross-entropy (longctx.loss, csrc/cross_entropy.cpp) against ATen's in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx.loss import cross_entropy

pytestmark = pytest.mark.usefixtures("cpp_extension")  # built once (tests/conftest.py)


def _case(N=37, V=1000 + 13, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g) * scale
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    return z, labels


def _ref(z, labels, ignore_index=-100):
    x = z.double().detach().requires_grad_()
    loss = F.cross_entropy(x, labels, ignore_index=ignore_index)
    loss.backward()
    return loss, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_match_float64(dtype):
    """fp32 within 1e-6 relative of float64 (loss and every gradient entry); bf16 logits are rounded first
    (the reference gets the same rounded values), the loss is fp32, the gradient rounded once to bf16."""
    z, labels = _case()
    z = z.to(dtype)
    x = z.clone().requires_grad_()
    loss = cross_entropy(x, labels)
    loss.backward()
    ref, ref_grad = _ref(z, labels)
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    bound = 1e-6 if dtype == torch.float32 else 2.0 ** -8  # bf16: one rounding of the fp32 gradient
    err = (x.grad.double() - ref_grad).abs()
    assert (err <= bound * ref_grad.abs() + 1e-9).all(), err.max()
    assert (x.grad[::5] == 0).all()  # ignored rows


def test_per_row_losses():
    """reduction="none": each row's loss as ATen's, 0 on ignored rows; anything else is refused."""
    z, labels = _case(seed=3)
    x = z.double().requires_grad_()
    want = F.cross_entropy(x, labels, reduction="none")
    got = cross_entropy(z.bfloat16(), labels, reduction="none")
    assert got.dtype == torch.float32 and got.shape == labels.shape and (got[::5] == 0).all()
    torch.testing.assert_close(got.double(), F.cross_entropy(z.bfloat16().double(), labels, reduction="none"),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cross_entropy(z, labels, reduction="none").double(), want.detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(z, labels, reduction="sum")


def test_strided_rows_ignore_index_and_scaled_gradient():
    """A view with a row stride (a causal LM's logits[:, :-1]), another ignore_index, a weighted loss."""
    z, labels = _case(N=40, V=517, seed=1)
    labels = labels.clamp(min=0)
    labels[3] = 7
    leaf = torch.randn(40, 600)
    leaf[:, :517] = z
    leaf.requires_grad_()
    strided = leaf[:, :517]
    assert strided.stride(0) == 600
    (3.0 * cross_entropy(strided, labels, ignore_index=7)).backward()
    x = z.double().requires_grad_()
    (3.0 * F.cross_entropy(x, labels, ignore_index=7)).backward()
    torch.testing.assert_close(leaf.grad[:, :517].double(), x.grad, rtol=1e-5, atol=1e-9)
    assert (leaf.grad[:, 517:] == 0).all() and (leaf.grad[3] == 0).all()


def test_extreme_logits_and_edge_rows():
    """Logits spread over hundreds (the exp's range reduction), every row ignored (NaN, as ATen), a label
    out of range (ATen's message), and a NaN logit that shows in the loss."""
    z, labels = _case(N=8, V=300, seed=2, scale=200.0)
    x = z.clone().requires_grad_()
    cross_entropy(x, labels).backward()
    ref, ref_grad = _ref(z, labels)
    torch.testing.assert_close(cross_entropy(z, labels).double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.isnan(cross_entropy(z, torch.full((8,), -100)))
    with pytest.raises(RuntimeError, match="out of bounds"):
        cross_entropy(z, torch.full((8,), 300))
    bad = z.clone()
    bad[1, 5] = float("nan")
    assert torch.isnan(cross_entropy(bad, labels.clamp(min=0)))
    # an infinite logit: NaN as ATen's for +inf; a -inf logit (a banned token) gets exactly 0 gradient
    lab = labels.clamp(min=0)
    for v in (float("inf"), float("-inf")):
        w = z.clone()
        w[2, (int(lab[2]) + 1) % 300] = v
        x = w.clone().requires_grad_()
        ref = F.cross_entropy(w.double(), lab, reduction="none")
        got = cross_entropy(x, lab, reduction="none")
        assert torch.equal(torch.isnan(got), torch.isnan(ref.float())), v
        if v < 0:
            got.sum().backward()
            assert x.grad[2, (int(lab[2]) + 1) % 300] == 0
    with pytest.raises(RuntimeError, match="out of bounds"):
        torch.ops.longctx_loss.cross_entropy_backward(torch.ones(8), z, torch.full((8,), 300), torch.zeros(8), -100)


def test_double_backward_matches_atens():
    z, labels = _case(N=6, V=50, seed=4)
    for fn in (cross_entropy, lambda a, b: F.cross_entropy(a, b)):
        x = z.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x, labels), x, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), x)
        if fn is cross_entropy:
            ours = gg
        else:
            torch.testing.assert_close(ours, gg, rtol=1e-5, atol=1e-8)


def test_models_loss_and_gradients_equal_atens(monkeypatch):
    """A masked-LM and a causal-LM training step give the loss and gradients of F.cross_entropy's path
    (LONGCTX_FUSED=0 runs that one), in fp32."""
    from longctx.models import LongctxConfig, LongctxForCausalLM, LongctxForMaskedLM

    cfg = dict(vocab_size=211, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=128, hidden_dropout_prob=0.0)
    ids = torch.randint(4, 211, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, ::3] = -100

    def step(cls, **extra):
        torch.manual_seed(0)
        model = cls(LongctxConfig(**cfg, **extra))
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    for cls, extra in ((LongctxForMaskedLM, {}), (LongctxForCausalLM, {"causal": True})):
        fast = step(cls, **extra)
        monkeypatch.setenv("LONGCTX_FUSED", "0")
        slow = step(cls, **extra)
        monkeypatch.delenv("LONGCTX_FUSED")
        torch.testing.assert_close(fast[0], slow[0], rtol=1e-6, atol=1e-6)
        for k in slow[1]:
            torch.testing.assert_close(fast[1][k], slow[1][k], rtol=1e-5, atol=1e-7, msg=k)
