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


class _HandMadeLayer:
    """A stand-in layer whose pre-softmax scores are a given matrix (-inf where masked)."""

    def __init__(self, scores):
        self._s = scores

    def scores(self, hidden, masked=True, dtype=None):
        s = self._s.to(dtype or self._s.dtype)
        return s if masked else s.nan_to_num(neginf=0.0)


def test_resolution_of_a_hand_made_masked_attention_matrix_is_the_papers_formula():
    # 4 positions, 1 head; the mask forbids (3, 0) and (3, 1): distance 3 is never attended, and
    # distance 2 is seen only by query 2 -> s[2] is that one score, not a mean with a masked one
    inf = float("-inf")
    s = torch.tensor([[[[0.0, inf, inf, inf],
                        [1.0, 0.5, inf, inf],
                        [-1.0, 2.0, 0.0, inf],
                        [inf, inf, -0.4, 0.2]]]], dtype=torch.float64)
    got = expected_scores_by_distance(_HandMadeLayer(s), torch.zeros(1, 4, 1))
    by_distance = [(0.0 + 0.5 + 0.0 + 0.2) / 4, (1.0 + 2.0 - 0.4) / 3, -1.0, inf]
    assert got.tolist() == pytest.approx(by_distance)
    e = [math.exp(x) for x in by_distance]  # e^{-inf} = 0: a distance nobody attends
    by_hand = sum(e[i] * (e[i] - e[i + 1]) for i in range(3)) / sum(e) ** 2
    assert attention_resolution(got) == pytest.approx(by_hand, rel=1e-12)
    # the unmasked expectation (what the old code did) differs
    assert attention_resolution(expected_scores_by_distance(_HandMadeLayer(s), torch.zeros(1, 4, 1), masked=False)) \
        != pytest.approx(by_hand)


def test_blockwise_mask_changes_resolution_and_matches_a_hand_built_expectation():
    from longctx.eval.extrapolation import set_blockwise
    torch.manual_seed(0)
    cfg = dict(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, causal=True, norm="pre")
    model = LongctxForCausalLM(LongctxConfig(**cfg, position="xpos", xpos_scale_base=16, attention="full")).eval()
    ids = torch.randint(0, 16, (2, 40))
    full = model_resolution(model, ids)
    b = 8
    set_blockwise(model, b)  # keys beyond the previous block are cut off
    blockwise = model_resolution(model, ids)
    assert all(abs(x - y) > 1e-3 for x, y in zip(full, blockwise))
    # oracle: the expectation over the pairs LeX's rule allows (k <= q, k in q's block or the one before)
    layer = model.longctx.layers[0].attention
    x = model.longctx.embeddings(ids, torch.arange(40))
    x = model.longctx.layers[0].attention_norm(x)
    raw = layer.scores(x, masked=False, dtype=torch.float64)  # (B, H, n, n)
    sums, counts = torch.zeros(40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64)
    for q in range(40):
        for k in range(40):
            if k <= q and k >= (q // b - 1) * b:
                sums[q - k] += raw[:, :, q, k].sum()
                counts[q - k] += raw.shape[0] * raw.shape[1]
    ref = torch.where(counts > 0, sums / counts.clamp(min=1), torch.tensor(float("-inf"), dtype=torch.float64))
    got = expected_scores_by_distance(layer, x)
    assert torch.isinf(got[2 * b:]).all() and torch.isfinite(got[:2 * b]).all()
    torch.testing.assert_close(got, ref)
    assert model_resolution(model, ids)[0] == pytest.approx(attention_resolution(ref), rel=1e-9)
