"""torch.compile of longctx models, and the traced form of the blocked kernel it runs.

Inside a traced graph the blocked kernel is ``traceable_band_attention`` (tensor ops only); it is held to
the dense reference here on outputs and gradients, and the compiled models to their eager selves.
Compiling through the "aot_eager" backend runs the whole capture (dynamo, fullgraph, AOT autograd) without
the C++ code generation of inductor, which costs minutes on two cores: inductor itself is the slow test.
"""
from __future__ import annotations

import os

import pytest
import torch

import longctx  # noqa: F401
from longctx.attention import AttentionPattern, attention, dense_attention
from longctx.models import LongctxConfig, LongctxForMaskedLM

PATTERNS = [
    AttentionPattern("sliding", window=5),
    AttentionPattern("sliding", window=4, causal=True),
    AttentionPattern("sliding", window=3, dilation=(1, 2)),
    AttentionPattern("blocks", block=7),
    AttentionPattern("blockwise_causal", block=6),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.kind}-{p.causal}-{p.dilation}")
def test_traced_paths_equal_dense_reference(pattern, monkeypatch):
    """attention() as a tracer sees it (is_compiling() true: the traceable kernel, global rows written by
    scatter, no branch on values), run eagerly in fp64 against the dense reference."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    g = torch.Generator().manual_seed(0)
    for n in (1, 13, 37):
        q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
        real = torch.rand(2, n, generator=g) > 0.2
        glob = (torch.rand(2, n, generator=g) > 0.8) & real
        slopes = torch.tensor([0.1, 0.3], dtype=torch.float64)
        for kw in ({}, {"key_padding_mask": real}, {"key_padding_mask": real, "global_mask": glob},
                   {"key_padding_mask": real, "alibi_slopes": slopes}):
            out = attention(q, k, v, pattern, backend="blocked", **kw)
            ref = dense_attention(q, k, v, pattern, **kw)
            live = real[:, None, :, None] if "key_padding_mask" in kw else torch.ones(1, 1, n, 1, dtype=torch.bool)
            # rows of padding queries are not defined by the reference's convention: compare real rows
            assert torch.allclose(out * live, ref * live, atol=1e-10)
            grads = torch.autograd.grad((out * live).sum(), (q, k, v))
            ref_grads = torch.autograd.grad((ref * live).sum(), (q, k, v))
            for a, b in zip(grads, ref_grads):
                assert torch.allclose(a, b, atol=1e-10)


def _mlm(**kw):
    torch.manual_seed(0)
    cfg = LongctxConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, attention="sliding", window=8, max_position_embeddings=256, **kw)
    return LongctxForMaskedLM(cfg)


def _batch(n=50):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 100, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, n - 10:] = 0
    return ids, mask


@pytest.mark.slow
def test_compile_fullgraph_sliding_mlm_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    model = _mlm(hidden_dropout_prob=0.0)  # training mode, without dropout's random draws
    ids, mask = _batch()
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) > 0.3, -100)

    def loss(logits):  # the masked-LM loss on the logits (the head's own loss selects labelled rows:
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())  # data-dependent)

    params = list(model.parameters())
    eager = model(ids, attention_mask=mask)
    eager_grads = torch.autograd.grad(loss(eager.logits), params, allow_unused=True)  # global projections: unused
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break fails
    out = compiled(ids, attention_mask=mask)
    grads = torch.autograd.grad(loss(out.logits), params, allow_unused=True)
    assert torch.allclose(out.logits, eager.logits, atol=1e-5)
    assert [g is None for g in grads] == [g is None for g in eager_grads]
    for a, b in zip(grads, eager_grads):
        assert a is None or torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_compile_with_global_tokens_matches_eager_and_breaks_per_layer_not_per_chunk():
    torch._dynamo.reset()
    model = _mlm().eval()
    counts = []
    for n in (50, 200):  # 4x the chunks: the same number of graph breaks
        ids, mask = _batch(n)
        glob = torch.zeros(2, n, dtype=torch.bool)
        glob[:, 0] = True
        glob[1, 7] = True
        with torch.no_grad():
            counts.append(torch._dynamo.explain(model)(ids, attention_mask=mask, global_attention_mask=glob)
                          .graph_break_count)
            if n == 50:  # compiled once (a second length would recompile: minutes on two cores)
                want = model(ids, attention_mask=mask, global_attention_mask=glob).logits
                got = torch.compile(model, backend="aot_eager")(ids, attention_mask=mask,
                                                                 global_attention_mask=glob).logits
                assert torch.allclose(got, want, atol=1e-5)
    assert counts[0] == counts[1] and counts[0] <= 8 * model.config.num_hidden_layers


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LONGCTX_SLOW_TESTS"), reason="inductor compiles C++ for minutes on 2 cores: "
                    "set LONGCTX_SLOW_TESTS=1")
def test_inductor_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _mlm().eval()
    ids, mask = _batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = torch.compile(model, fullgraph=True)(ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-5)
