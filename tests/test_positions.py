"""Position encodings against their definitions."""
import math

import pytest
import torch

from longctx.attention import AttentionPattern, attention
from longctx.errors import LongctxError
from longctx.positions import Rotary, alibi_slopes, extend_learned_positions, sinusoidal_table


@pytest.mark.parametrize("xpos", [False, True])
def test_rotary_scores_depend_only_on_relative_position(xpos):
    torch.manual_seed(0)
    d = 32
    rot = Rotary(d, xpos=xpos, scale_base=512).double()
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def score(n, m):
        qn = rot.rotate(q[None], torch.tensor([n]), key=False)
        km = rot.rotate(k[None], torch.tensor([m]), key=True)
        return (qn * km).sum().item()

    for n, m in [(5, 3), (100, 7), (40, 90)]:
        for shift in (1, 17, 1000):
            assert score(n, m) == pytest.approx(score(n + shift, m + shift), rel=1e-9, abs=1e-12)
    # and it does depend on the distance
    assert abs(score(10, 0) - score(20, 0)) > 1e-3


def test_xpos_matches_its_formula_pair_by_pair():
    d, B, gamma = 8, 512.0, 0.4
    rot = Rotary(d, xpos=True, scale_base=B).double()
    x = torch.randn(3, d, dtype=torch.float64)
    pos = torch.tensor([0, 7, 1500])
    for key in (False, True):
        got = rot.rotate(x, pos, key=key)
        for r, p in enumerate(pos.tolist()):
            for i in range(d // 2):
                theta = 10000 ** (-2 * i / d)
                zeta = (2 * i / d + gamma) / (1 + gamma)
                scale = zeta ** ((-p if key else p) / B)
                a, b = x[r, 2 * i].item(), x[r, 2 * i + 1].item()
                c, s = math.cos(p * theta), math.sin(p * theta)
                assert got[r, 2 * i].item() == pytest.approx(scale * (a * c - b * s), rel=1e-12)
                assert got[r, 2 * i + 1].item() == pytest.approx(scale * (a * s + b * c), rel=1e-12)


def test_xpos_score_is_rope_score_times_decay():
    """For q, k living in rotation pair i: score_xpos(n, m) = zeta_i^((n-m)/B) * score_rope(n, m)."""
    d, B = 16, 512.0
    xpos, rope = Rotary(d, xpos=True, scale_base=B).double(), Rotary(d).double()
    for i in (0, 3, 7):
        x = torch.zeros(1, d, dtype=torch.float64)
        x[0, 2 * i] = 1.0
        zeta = (2 * i / d + 0.4) / 1.4
        for n, m in [(3, 0), (700, 100), (2000, 5)]:
            def s(r):
                return (r.rotate(x, torch.tensor([n]), False) * r.rotate(x, torch.tensor([m]), True)).sum().item()
            assert s(xpos) == pytest.approx(zeta ** ((n - m) / B) * s(rope), rel=1e-10, abs=1e-14)
        assert zeta < 1  # so the factor decays with distance


def test_alibi_slopes_are_the_papers():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert alibi_slopes(4).tolist() == pytest.approx([2 ** -(2 * (i + 1)) for i in range(4)])
    # 12 heads: the 8-head sequence, then every other slope of the 16-head one
    s16 = [2 ** -(0.5 * (i + 1)) for i in range(16)]
    assert alibi_slopes(12).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)] + s16[0::2][:4])


def test_alibi_bias_equals_its_definition():
    """Attention with ALiBi equals softmax(qk/sqrt(d) - m_h |i-j|) computed by hand."""
    torch.manual_seed(0)
    H, n, d = 4, 37, 8
    q, k, v = (torch.randn(1, H, n, d, dtype=torch.float64) for _ in range(3))
    m = alibi_slopes(H).double()
    i = torch.arange(n)
    by_hand = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) - m.view(H, 1, 1) * (i[:, None] - i[None, :]).abs(), -1) @ v
    for pattern, backend in [(AttentionPattern("full"), "sdpa"), (AttentionPattern("full"), "blocked"),
                             (AttentionPattern("full"), "dense")]:
        out = attention(q, k, v, pattern, alibi_slopes=m, backend=backend)
        torch.testing.assert_close(out, by_hand)


def test_sinusoidal_table_definition():
    t = sinusoidal_table(50, 16)
    assert t[7, 4].item() == pytest.approx(math.sin(7 / 10000 ** (4 / 16)), rel=1e-6)
    assert t[7, 5].item() == pytest.approx(math.cos(7 / 10000 ** (4 / 16)), rel=1e-6)


def test_learned_positions_extend_by_copying_with_roberta_offset():
    table = torch.arange(2 + 512, dtype=torch.float32)[:, None].repeat(1, 3)  # row r holds r
    ext = extend_learned_positions(table, 4096, offset=2)
    assert ext.shape == (4098, 3)
    assert ext[:2].tolist() == table[:2].tolist()
    # position p (row p + 2) copies learned row (p mod 512) + 2
    for p in (0, 511, 512, 1000, 4095):
        assert ext[p + 2, 0].item() == (p % 512) + 2
    with pytest.raises(LongctxError):
        extend_learned_positions(table[:2], 10, offset=2)
