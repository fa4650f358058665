"""`longctx analyze attention`: attention maps from every mechanism, and the statistics read off them.

Oracles: hand-built models whose weights fix where a head looks (only at heading tokens; only at the
previous token), so the shares, distances and entropies they must report follow from the token layout
alone; the layer's own output (the map times v is what the model computed, for every registered
mechanism); the dense reference backend (analysis through the blocked kernel equals it).
"""
import json
import math

import pytest
import torch

import longctx.attention  # noqa: F401  (registers every mechanism)
from longctx.attention.mechanism import MECHANISMS
from longctx.eval.analysis import (AttentionStats, analyze_model, document_windows, sentence_ids,
                                   write_analysis)
from longctx.models import LongctxConfig, LongctxForMaskedLM

HEADING, BODY = 1, 2
THETA = 2 * math.pi / 64  # position p is the angle p * THETA; n <= 32 keeps every difference unique


def hand_built(attention="full", n_pos=32, global_projections=False):
    """One layer, two heads, fp64. Head 0 looks only at heading tokens (id 1): its query is a constant,
    its key reads the token's kind, so its score is +100 on headings and -100 elsewhere. Head 1 looks
    only at the previous token: positions are angles p * THETA, its query turns its own angle back by one
    step, so its score is S cos((i - 1 - j) THETA), largest at j = i - 1 by S (1 - cos THETA) = 60 nats."""
    cfg = LongctxConfig(vocab_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, norm="pre",
                        position="learned", max_position_embeddings=n_pos, attention=attention,
                        hidden_dropout_prob=0.0, global_projections=global_projections, layer_norm_eps=1e-12)
    model = LongctxForMaskedLM(cfg).double().eval()
    base = model.longctx
    with torch.no_grad():
        for p in base.parameters():
            p.zero_()
        # dims 0-3: position (cos, sin, -cos, -sin); dims 4-5: +-(1, -1) by kind. Zero mean and a constant
        # norm, so the pre-attention LayerNorm (weight 1, bias 0) only multiplies by sqrt(2): u = sqrt(2) x
        ang = torch.arange(n_pos, dtype=torch.float64) * THETA
        base.embeddings.position_embeddings.weight[:, :4] = torch.stack([ang.cos(), ang.sin(), -ang.cos(), -ang.sin()], 1)
        base.embeddings.word_embeddings.weight[HEADING, 4:6] = torch.tensor([1.0, -1.0])
        base.embeddings.word_embeddings.weight[BODY, 4:6] = torch.tensor([-1.0, 1.0])
        base.layers[0].attention_norm.weight.fill_(1.0)
        att = base.layers[0].attention
        # head 0 (q, k dims 0-3): q = (20, 0, 0, 0), k0 = 10 u4 / sqrt(2) = +-10; score 20 * 10 / sqrt(4)
        att.query.bias[0] = 20.0
        att.key.weight[0, 4] = 10.0 / math.sqrt(2)
        # head 1 (dims 4-7): q = r R(-THETA) (cos, sin)(p), k = r (cos, sin)(p); score r^2 cos(...) / 2
        S = 60.0 / (1 - math.cos(THETA))
        r = math.sqrt(2 * S) / math.sqrt(2)
        c, s = math.cos(THETA), math.sin(THETA)
        att.query.weight[4:6, 0:2] = r * torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
        att.key.weight[4:6, 0:2] = r * torch.eye(2, dtype=torch.float64)
    return model


def layout(n, heads_at, sentence_len=5):
    ids = torch.full((n,), BODY)
    ids[heads_at] = HEADING
    return {"id": "doc", "input_ids": ids, "heading": ids == HEADING,
            "sentence": torch.arange(n) // sentence_len}


def expected(win, window):
    """What heads 0 and 1 must report on one window, from the layout alone."""
    n = len(win["input_ids"])
    H = win["heading"].nonzero().flatten().tolist()
    sent = win["sentence"].tolist()
    head0 = {"heading_share": 1.0, "entropy": math.log(len(H)),
             "mean_distance": sum(abs(i - j) for i in range(n) for j in H) / (n * len(H)),
             "sentence_share": sum(sent[j] == sent[i] for i in range(n) for j in H) / (n * len(H)),
             "beyond_window": sum(abs(i - j) > window for i in range(n) for j in H) / (n * len(H))}
    # head 1: row 0 has no previous token; its best key is itself (cos THETA, against cos 2 THETA for token 1)
    prev = [[(i - 1, 1.0)] if i else [(0, 1.0)] for i in range(n)]
    head1 = {"heading_share": sum(w for row in prev for j, w in row if j in H) / n,
             "mean_distance": sum(w * abs(i - j) for i, row in enumerate(prev) for j, w in row) / n,
             "sentence_share": sum(w for i, row in enumerate(prev) for j, w in row if sent[j] == sent[i]) / n,
             "entropy": 0.0, "beyond_window": 0.0}
    return head0, head1


@pytest.mark.parametrize("n", [17, 32])
def test_hand_built_heads_report_the_shares_and_distances_their_weights_imply(n):
    model = hand_built()
    win = layout(n, [0, 6, n - 4])
    res = analyze_model(model, [win], global_tokens="headings", window=1)
    h0, h1 = res["layers"][0]["heads"]
    want0, want1 = expected(win, 1)
    for key, val in want0.items():
        assert h0[key] == pytest.approx(val, abs=1e-6), key
    for key, val in want1.items():
        assert h1[key] == pytest.approx(val, abs=1e-6), key
    assert h0["global_share"] == pytest.approx(1.0)  # the headings are this run's global tokens
    assert h1["mean_distance"] == pytest.approx((n - 1) / n)  # distance 1 everywhere but row 0
    prof = h1["distance_profile"]  # bins 0 | 1 | 2-3 | ...
    assert prof[0] == pytest.approx(1 / n) and prof[1] == pytest.approx(1 - 1 / n) and sum(prof[2:]) < 1e-9
    assert res["heading_fraction"] == pytest.approx(3 / n)
    for h in (h0, h1):
        assert h["row_sum_min"] == pytest.approx(1.0, abs=1e-12) and h["row_sum_max"] == pytest.approx(1.0, abs=1e-12)


def test_heading_head_behind_a_sliding_window_reaches_far_headings_only_as_global_tokens():
    """Same weights, sliding window w=2: with headings global the heading head still puts all its mass
    on headings (most beyond the window); without global tokens it can only see headings inside its
    window, and rows with none nearby spread over their window instead."""
    n = 32
    model = hand_built({"type": "sliding", "window": 2})
    win = layout(n, [0, 16])
    glob = analyze_model(model, [win], global_tokens="headings", batch_size=1)
    h0 = glob["layers"][0]["heads"][0]
    assert glob["layers"][0]["window"] == 2
    want0, _ = expected(win, 2)
    assert h0["heading_share"] == pytest.approx(1.0) and h0["beyond_window"] == pytest.approx(want0["beyond_window"])
    local = analyze_model(model, [win], global_tokens="none")["layers"][0]["heads"][0]
    near = sum(1 for i in range(n) if min(abs(i - 0), abs(i - 16)) <= 2)
    assert local["heading_share"] == pytest.approx(near / n, abs=1e-9)  # 1.0 where a heading is near, else 0
    assert local["beyond_window"] == pytest.approx(0.0, abs=1e-12)


def _random_model(attention, global_projections=True, backend="auto", n_pos=64, layers=2):
    torch.manual_seed(0)
    cfg = LongctxConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        max_position_embeddings=n_pos, attention=attention, hidden_dropout_prob=0.0,
                        global_projections=global_projections, attention_backend=backend, initializer_range=0.5)
    return LongctxForMaskedLM(cfg).double().eval()


def _batch(B=2, n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (B, n), generator=g)
    att = torch.ones(B, n, dtype=torch.long)
    att[1, n - 7:] = 0  # a padded row
    glob = torch.zeros(B, n, dtype=torch.bool)
    glob[:, [0, 11, 23]] = True
    return ids, att, glob


def model_level() -> dict:
    """The model-level table, from the registry: every mechanism with an attention map, as
    ``{type: name, **its "test" example}`` (mechanism.py: ``Mechanism.examples``)."""
    from longctx.attention.mechanism import Mechanism
    return {name: {"type": name, **cls.example("test")} for name, cls in sorted(MECHANISMS.items())
            if cls.attention_map is not Mechanism.attention_map}


MODEL_LEVEL = model_level()  # at collection: a mechanism registered later is in model_level(), not here


def test_model_level_table_covers_every_mechanism_with_an_attention_map():
    assert {"full", "sliding", "blocks", "blockwise_causal", "bigbird", "linformer", "performer", "nystrom",
            "lsh"} <= set(MODEL_LEVEL)
    assert MODEL_LEVEL["sliding"] == {"type": "sliding", "window": 3, "dilation": [1, 2]}


@pytest.mark.parametrize("name", sorted(MODEL_LEVEL))
def test_output_attentions_times_v_is_what_each_layer_computed(name):
    """For every mechanism: the (B, H, n, n) maps of output_attentions, times each layer's values (the
    global projections' values on global rows), give that layer's output; real rows sum to one. The
    layer's own forward is the oracle, so the map shown is the one the model used."""
    model = _random_model(model_level()[name])
    ids, att, glob = _batch()
    takes_global = model.longctx.layers[0].attention.mechanism.supports.global_tokens
    gm = glob if takes_global else None
    seen = []

    def grab(mod, args, kwargs, out):
        seen.append((args, out))

    hooks = [lay.attention.register_forward_hook(grab, with_kwargs=True) for lay in model.longctx.layers]
    with torch.no_grad():
        res = model(ids, attention_mask=att, global_attention_mask=gm, output_attentions=True)
    for h in hooks:
        h.remove()
    assert len(res.attentions) == 2 and len(seen) == 2
    real = att.bool()
    rows = real[:, None, :].expand(-1, 2, -1)
    for A in res.attentions:
        assert A.shape == (2, 2, 40, 40)
        if name not in ("linformer", "nystrom"):  # their effective matrices are not distributions
            torch.testing.assert_close(A.sum(-1)[rows], torch.ones_like(A.sum(-1)[rows]))
            assert (A >= 0).all()
    for li, layer in enumerate(model.longctx.layers):
        (hidden, kpm, g, positions, cache, *_), (out, probs) = seen[li]
        assert probs is res.attentions[li]
        sa = layer.attention
        _, _, v = sa.project(hidden, positions)
        A = res.attentions[li]
        ctx = A @ v
        if sa.global_projections and g is not None:
            _, _, vg = sa.project(hidden, positions, glob=True)
            ctx = torch.where(g[:, None, :, None], A @ vg, ctx)
        mine = sa.out(ctx.transpose(1, 2).reshape(2, 40, -1))
        torch.testing.assert_close(mine[real], out[real], atol=1e-9, rtol=1e-9)


def test_analysis_through_the_blocked_kernel_equals_the_dense_reference():
    """A sliding model with global tokens, run with the blocked CPU kernel and with the dense reference:
    the same outputs, and the same analysis."""
    att = {"type": "sliding", "window": 4}
    blocked, dense = _random_model(att, backend="blocked"), _random_model(att, backend="dense")
    dense.load_state_dict(blocked.state_dict())
    ids, am, glob = _batch(n=40)
    with torch.no_grad():
        a = blocked(ids, attention_mask=am, global_attention_mask=glob, output_attentions=True)
        b = dense(ids, attention_mask=am, global_attention_mask=glob, output_attentions=True)
    torch.testing.assert_close(a.logits, b.logits)
    for x, y in zip(a.attentions, b.attentions):
        torch.testing.assert_close(x, y)
    wins = [{"id": str(r), "input_ids": ids[r][am[r].bool()], "heading": glob[r][am[r].bool()],
             "sentence": torch.arange(int(am[r].sum())) // 6} for r in range(2)]
    ra = analyze_model(blocked, wins, "headings", batch_size=2)
    rb = analyze_model(dense, wins, "headings", batch_size=2)
    assert _same(ra, rb)
    for layer in ra["layers"]:
        for h in layer["heads"]:
            assert abs(h["row_sum_min"] - 1) < 1e-9 and abs(h["row_sum_max"] - 1) < 1e-9


def _same(a, b):
    """Nested results equal, floats to 1e-9 (the kernels sum in different orders)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b)
        return all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
        return True
    assert a == b
    return True


def test_output_attentions_is_off_by_default_and_changes_nothing():
    model = _random_model({"type": "sliding", "window": 3})
    ids, am, glob = _batch()
    with torch.no_grad():
        plain = model(ids, attention_mask=am, global_attention_mask=glob)
        withmaps = model(ids, attention_mask=am, global_attention_mask=glob, output_attentions=True)
    assert plain.attentions is None
    torch.testing.assert_close(plain.logits, withmaps.logits, atol=0, rtol=0)


def test_sentence_ids_follow_sentence_ends_and_line_breaks():
    text = "Intro\nFirst one. Second one! Third\nfour."
    offs = [(0, 5), (6, 11), (12, 16), (16, 17), (18, 24), (29, 33), (35, 39), (40, 40)]
    assert sentence_ids(text, offs).tolist() == [0, 1, 1, 1, 2, 3, 4, -1]


def test_document_windows_mark_headings_from_structure_spans():
    from longctx.data.tokenizer import ByteTokenizer
    text = "Title\nBody text here. More text.\nMethods\nLast words."
    doc = {"id": "d", "text": text, "structure": [{"kind": "title", "level": 0, "start": 0, "end": 5},
                                                  {"kind": "section", "level": 1, "start": 33, "end": 40}]}
    (w,) = document_windows([doc], ByteTokenizer(), seq_len=1000)
    heading_chars = "".join(text[i] for i in range(len(text)) if w["heading"][i])
    assert heading_chars == "TitleMethods"
    assert w["sentence"][0] == 0 and w["sentence"][6] == 1 and w["sentence"][-1] == 4


def test_stats_refuse_to_average_nothing():
    from longctx.errors import LongctxError
    with pytest.raises(LongctxError, match="no token"):
        AttentionStats(1, 1, [None], 4).result()


def test_write_analysis_two_models_side_by_side(tmp_path):
    model = hand_built()
    win = layout(20, [0, 9])
    results = {"headings-global": analyze_model(model, [win], "headings", window=1),
               "text-only": analyze_model(model, [win], "none", window=1)}
    paths = write_analysis(results, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"headings-global", "text-only"}
    assert data["text-only"]["layers"][0]["heads"][0]["global_share"] == 0.0
    md = paths["md"].read_text()
    assert "| headings-global | 0 |" in md and "| text-only | 0 |" in md and "attention_heatmaps.png" in md
    for key in ("heatmaps", "distance"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"
