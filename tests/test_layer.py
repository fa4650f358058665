"""The attention layer: Hugging Face LongformerSelfAttention semantics, and clear config errors."""
import pytest
import torch
from transformers import LongformerConfig
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from longctx.attention import AttentionPattern, SelfAttention
from longctx.errors import LongctxError


def _copy_into_ours(hf: LongformerSelfAttention, ours: SelfAttention, hidden: int):
    with torch.no_grad():
        for name in ["query", "key", "value", "query_global", "key_global", "value_global"]:
            getattr(ours, name).weight.copy_(getattr(hf, name).weight)
            getattr(ours, name).bias.copy_(getattr(hf, name).bias)
        ours.out.weight.copy_(torch.eye(hidden))  # HF's layer stops before the output projection
        ours.out.bias.zero_()


@pytest.mark.parametrize("attention_window,heads,backend", [(8, 2, "auto"), (16, 4, "auto"), (16, 4, "dense")])
def test_matches_hugging_face_longformer_self_attention(attention_window, heads, backend):
    torch.manual_seed(0)
    hidden, B, n = 32, 2, 4 * attention_window  # HF's layer needs n to be a multiple of the window
    cfg = LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[attention_window],
                           attention_probs_dropout_prob=0.0)
    hf = LongformerSelfAttention(cfg, layer_id=0).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = SelfAttention(hidden, heads, AttentionPattern("sliding", window=attention_window // 2),
                         global_projections=True, backend=backend)
    _copy_into_ours(hf, ours, hidden)
    x = torch.randn(B, n, hidden)
    real = torch.ones(B, n, dtype=torch.bool)
    real[1, n - 5:] = False
    glob = torch.zeros(B, n, dtype=torch.bool)
    glob[0, [0, 3, n // 2]] = True
    glob[1, 1] = True
    for g in (glob, torch.zeros_like(glob)):
        # HF's encoding of the same masks: -10000 padding, 0 local, +10000 global
        mask = torch.zeros(B, n)
        mask[~real] = -10000.0
        mask[g] = 10000.0
        with torch.no_grad():
            ref = hf(x, attention_mask=mask, is_index_masked=~real, is_index_global_attn=g,
                     is_global_attn=bool(g.any()))[0]
            out = ours(x, key_padding_mask=real, global_mask=g)
        # HF zeroes the outputs of padding queries; every model discards them
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_inconsistent_configuration_is_a_clear_error():
    with pytest.raises(LongctxError, match="dilation lists 3 values but the layer has 4 heads"):
        SelfAttention(32, 4, AttentionPattern("sliding", window=4, dilation=(1, 2, 3)))
    with pytest.raises(LongctxError, match="not divisible"):
        SelfAttention(30, 4, AttentionPattern("full"))
    with pytest.raises(LongctxError, match="position encoding 'rotary' is unknown"):
        SelfAttention(32, 4, AttentionPattern("full"), position="rotary")
    with pytest.raises(LongctxError, match="even head size"):
        SelfAttention(36, 4, AttentionPattern("full"), position="rope")
    with pytest.raises(LongctxError, match="needs a block size"):
        AttentionPattern("blocks")
    with pytest.raises(LongctxError, match="dilation applies to the sliding window only"):
        AttentionPattern("blocks", block=4, dilation=2)
    with pytest.raises(LongctxError, match="kind 'sparse' is unknown"):
        AttentionPattern("sparse")


def test_any_length_in_any_length_out():
    torch.manual_seed(0)
    layer = SelfAttention(16, 2, AttentionPattern("sliding", window=64))
    for n in (1, 2, 63, 64, 65, 129):
        x = torch.randn(1, n, 16)
        assert layer(x).shape == (1, n, 16)


def test_scores_are_the_mechanisms_pre_softmax_scores_with_bias_and_mask():
    """The public analysis method: softmax of ``scores`` over v gives the layer's own attention."""
    from longctx.attention.reference import masked_softmax
    torch.manual_seed(0)
    layer = SelfAttention(16, 2, AttentionPattern("sliding", window=3, causal=True), position="alibi").double()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    s = layer.scores(x)
    assert s.shape == (2, 2, 20, 20) and torch.isinf(s[:, :, 0, 1:]).all() and torch.isinf(s[:, :, 10, :6]).all()
    _, _, v = layer.project(x, torch.arange(20))
    ctx = masked_softmax(s, ~torch.isinf(s)) @ v
    with torch.no_grad():
        want = layer(x)
    torch.testing.assert_close(layer.out(ctx.transpose(1, 2).reshape(2, 20, 16)), want)
