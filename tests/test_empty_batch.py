"""An empty batch (B = 0) gives a correctly shaped empty result and empty gradients on every kernel and
family, and a model takes a (0, n) input: the fused kernel once died of SIGFPE on it (its work split
divides by batch x heads), so those cases run in a subprocess, where a regression fails one test
instead of killing pytest."""
import subprocess
import sys
import textwrap

import pytest
import torch

import longctx.attention  # noqa: F401  (registers the families)
from longctx.attention.mechanism import LayerContext, build

pytestmark = pytest.mark.usefixtures("cpp_extension")  # the fused kernel is what crashed


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-3000:]}"
    return r.stdout


def test_attention_on_an_empty_batch_on_every_backend():
    out = _run("""
        import torch
        from longctx.attention import AttentionPattern, attention
        from longctx.attention import fused
        from longctx.positions import alibi_slopes
        assert fused.load(build=False)  # the conftest fixture built it: the fused case is really run
        for backend in ("dense", "blocked", "fused", "blocked-torch", "sdpa"):
            pattern = AttentionPattern("full") if backend == "sdpa" else AttentionPattern("sliding", window=4)
            for extra in (False, True):
                q, k, v = (torch.randn(0, 2, 10, 8, requires_grad=True) for _ in range(3))
                slopes = alibi_slopes(2).requires_grad_() if extra else None
                kw = dict(key_padding_mask=torch.ones(0, 10, dtype=torch.bool),
                          global_mask=torch.zeros(0, 10, dtype=torch.bool), alibi_slopes=slopes) if extra else {}
                o = attention(q, k, v, pattern, backend=backend, **kw)
                assert o.shape == (0, 2, 10, 8), (backend, o.shape)
                o.sum().backward()
                assert all(t.grad.shape == t.shape for t in (q, k, v)), backend
                # zero where a slope gradient comes back (PyTorch's SDPA gives none on an empty batch)
                assert slopes is None or slopes.grad is None or not slopes.grad.any(), backend
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.slow
def test_masked_lm_on_an_empty_batch():
    out = _run("""
        import torch
        from longctx.models import LongctxConfig, LongctxForMaskedLM
        cfg = LongctxConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, window=3)
        ids = torch.zeros(0, 10, dtype=torch.long)
        logits = LongctxForMaskedLM(cfg)(input_ids=ids).logits
        assert logits.shape == (0, 10, 64), logits.shape
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.parametrize("name,spec,causal", [
    ("bigbird", {"block": 4, "random": 1, "global_blocks": 1}, False),
    ("lsh", {"chunk_length": 4, "num_buckets": 4, "n_hashes": 2}, False),
    ("lsh", {"chunk_length": 4, "num_buckets": 4}, True),
])
def test_families_on_an_empty_batch(name, spec, causal):
    mech = build(name, spec, LayerContext(num_heads=2, head_dim=8, max_len=64, causal=causal))
    q, k, v = (torch.randn(0, 2, 10, 8, requires_grad=True) for _ in range(3))
    out = mech(q, k, v, key_padding=torch.ones(0, 10, dtype=torch.bool))
    assert out.shape == (0, 2, 10, 8)
    out.sum().backward()
    assert all(t.grad.shape == t.shape for t in (q, k, v))
