"""Attention resolution against its formula, and what it says about position encodings."""
import math

import pytest
import torch

from longctx.eval.resolution import attention_resolution, expected_scores_by_distance, model_resolution
from longctx.models import LongctxConfig, LongctxForCausalLM


def test_resolution_matches_the_formula_by_hand():
    s = [0.5, -0.2, -1.0, -1.3]
    e = [math.exp(x) for x in s]
    by_hand = sum(e[i] * (e[i] - e[i + 1]) for i in range(3)) / sum(e) ** 2
    assert attention_resolution(torch.tensor(s, dtype=torch.float64)) == pytest.approx(by_hand, rel=1e-12)
    # shift invariance, zero for flat scores, higher for a sharper decay
    assert attention_resolution(torch.tensor(s, dtype=torch.float64) + 7) == pytest.approx(by_hand, rel=1e-12)
    assert attention_resolution(torch.zeros(50)) == 0.0
    d = torch.arange(50.0)
    assert attention_resolution(-0.5 * d) > attention_resolution(-0.05 * d) > 0


def test_xpos_keeps_resolution_where_rope_scores_can_rise_again():
    """With identical q = k vectors, xPos's expected score decays with distance while RoPE's oscillates:
    the per-distance scores from the layer reflect the decay factor zeta^(i/B)."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, causal=True, norm="pre")
    for position in ("rope", "xpos"):
        model = LongctxForCausalLM(LongctxConfig(**cfg, position=position, xpos_scale_base=16)).eval()
        layer = model.longctx.layers[0].attention
        with torch.no_grad():
            layer.key.weight.copy_(layer.query.weight)
            layer.key.bias.copy_(layer.query.bias)
        x = torch.randn(1, 1, 32).expand(1, 64, 32).contiguous()  # the same token everywhere
        s = expected_scores_by_distance(layer, x)
        if position == "xpos":
            assert s[32] < 0.5 * s[0] and s[63] < s[32]
        else:  # RoPE: |score| bounded by the distance-0 value, no decay guaranteed
            assert s.abs().max() <= s[0] + 1e-9
    res = model_resolution(model, torch.randint(0, 16, (2, 48)))
    assert len(res) == 1 and 0 <= res[0] <= 1
