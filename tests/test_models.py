"""Encoder and decoder models: Hugging Face loading, padding, global tokens, cached generation, learning."""
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

import longctx  # noqa: F401  (registers the Auto classes)
from longctx.errors import LongctxError
from longctx.models import (
    LongctxConfig,
    LongctxForCausalLM,
    LongctxForMaskedLM,
    LongctxForQuestionAnswering,
    LongctxForSequenceClassification,
    LongctxModel,
)

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
             hidden_dropout_prob=0.0, sep_token_id=2)


@pytest.mark.parametrize("cls,auto", [
    (LongctxModel, AutoModel), (LongctxForMaskedLM, AutoModelForMaskedLM),
    (LongctxForSequenceClassification, AutoModelForSequenceClassification),
    (LongctxForQuestionAnswering, AutoModelForQuestionAnswering),
])
def test_encoder_round_trips_through_auto_classes(tmp_path, cls, auto):
    torch.manual_seed(0)
    cfg = LongctxConfig(**SMALL, window=3, dilation=[1, 1, 2, 2], num_labels=3)
    model = cls(cfg).eval()
    ids = torch.randint(3, 64, (2, 40))
    ids[:, 5] = 2  # a separator, for the QA preset
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "longctx"
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    for key in a.keys():
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_decoder_round_trips_and_ties_weights(tmp_path):
    cfg = LongctxConfig(**SMALL, causal=True, position="xpos", norm="pre", attention="blockwise_causal", block=8)
    model = LongctxForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.longctx.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.longctx.embeddings.word_embeddings.weight
    ids = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("overrides", [
    dict(window=4, position="learned"),
    dict(window=4, position="alibi", dilation=[1, 2, 1, 3]),
    dict(attention="blocks", block=7, position="rope"),
    dict(attention="full", position="sinusoidal", norm="pre"),
    dict(window=5, causal=True, position="xpos"),
])
def test_padding_does_not_change_real_tokens(overrides):
    torch.manual_seed(0)
    cfg = LongctxConfig(**SMALL | overrides)
    model = LongctxModel(cfg).eval()
    ids = torch.randint(3, 64, (1, 37))
    glob = torch.zeros(1, 37, dtype=torch.bool)
    glob[0, [0, 20]] = True
    padded = torch.cat([ids, torch.zeros(1, 11, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 37), torch.zeros(1, 11)], 1)
    gpad = torch.cat([glob, torch.zeros(1, 11, dtype=torch.bool)], 1)
    with torch.no_grad():
        a = model(ids, global_attention_mask=glob).last_hidden_state
        b = model(padded, attention_mask=mask, global_attention_mask=gpad).last_hidden_state[:, :37]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _influence(model, ids, src, dst, glob):
    """Does the output at dst change when the token at src changes?"""
    other = ids.clone()
    other[0, src] = (ids[0, src] + 7) % 60 + 3
    with torch.no_grad():
        a = model(ids, global_attention_mask=glob).last_hidden_state[0, dst]
        b = model(other, global_attention_mask=glob).last_hidden_state[0, dst]
    return (a - b).abs().max().item()


def test_distant_token_influences_only_through_a_global_token():
    torch.manual_seed(0)
    big_init = dict(window=2, initializer_range=0.3)  # sharp attention, so a path carries a clear signal
    model = LongctxModel(LongctxConfig(**SMALL | big_init | dict(num_hidden_layers=2))).eval()
    ids = torch.randint(3, 64, (1, 80))
    none = torch.zeros(1, 80, dtype=torch.bool)
    via = none.clone()
    via[0, 40] = True  # a global token between them
    # 2 layers x window 2 reach 4 positions: position 0 cannot reach 70 ...
    assert _influence(model, ids, 0, 70, none) == 0.0
    # ... except through the global token: 0 -> 40 in layer 1 (global query), 40 -> 70 in layer 2
    assert _influence(model, ids, 0, 70, via) > 1e-3
    # and a global source reaches every position in one layer
    one = LongctxModel(LongctxConfig(**SMALL | big_init | dict(num_hidden_layers=1))).eval()
    src_global = none.clone()
    src_global[0, 0] = True
    assert _influence(one, ids, 0, 70, none) == 0.0
    assert _influence(one, ids, 0, 70, src_global) > 1e-3


@pytest.mark.parametrize("overrides,bound", [
    (dict(window=6, position="rope"), 6),
    (dict(window=3, dilation=[1, 2, 2, 1], position="alibi"), 6),
    (dict(attention="blockwise_causal", block=8, position="xpos"), 15),
    (dict(window=5, position="learned"), 5),
])
def test_cached_generation_equals_recomputation_with_bounded_cache(overrides, bound):
    torch.manual_seed(0)
    cfg = LongctxConfig(**SMALL | dict(causal=True, norm="pre") | overrides)
    model = LongctxForCausalLM(cfg).eval()
    prompt = torch.randint(0, 64, (2, 9))
    steps = 4 * 8 + 10  # more than 4x the window / block
    cached = model.generate(prompt, max_new_tokens=steps)
    full = model.generate(prompt, max_new_tokens=steps, use_cache=False)
    assert torch.equal(cached, full)
    # the cache of every layer stays bounded by the pattern, however long the generation
    cache, sizes = None, []
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache = out.past_key_values
        for t in range(steps):
            out = model(cached[:, 9 + t:10 + t], past_key_values=cache, use_cache=True)
            sizes.append(max(len(c) for c in cache))
    assert max(sizes) <= bound
    assert all(c.k.shape[2] == len(c) for c in cache)


def test_full_causal_cache_grows_but_still_matches():
    cfg = LongctxConfig(**SMALL | dict(causal=True, attention="full", position="rope"))
    model = LongctxForCausalLM(cfg).eval()
    prompt = torch.randint(0, 64, (1, 5))
    assert torch.equal(model.generate(prompt, max_new_tokens=20), model.generate(prompt, max_new_tokens=20, use_cache=False))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = LongctxConfig(**SMALL | dict(window=4))
    model = LongctxForMaskedLM(cfg)
    ids = torch.randint(3, 64, (2, 50))
    labels = torch.where(torch.rand(2, 50) < 0.3, ids, -100)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        if ckpt:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            assert all(layer.gradient_checkpointing for layer in model.longctx.layers)
        model.train()
        model(ids, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    torch.manual_seed(0)
    model = LongctxForMaskedLM(LongctxConfig(**SMALL | dict(window=4))).eval()
    ids = torch.randint(3, 64, (2, 50))
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_config_errors_name_the_field():
    with pytest.raises(LongctxError, match="'num_attention_heads'"):
        LongctxConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(LongctxError, match="'window'"):
        LongctxConfig(num_hidden_layers=2, window=[1, 2, 3])
    with pytest.raises(LongctxError, match="'dilation'"):
        LongctxConfig(num_attention_heads=4, dilation=[1, 2])
    with pytest.raises(LongctxError, match="'position'"):
        LongctxConfig(position="relative")
    with pytest.raises(LongctxError, match="'layers'"):
        LongctxConfig(num_hidden_layers=2, layers=[{"kind": "sliding", "window": 2, "size": 3}] * 2)
    with pytest.raises(LongctxError, match="causal"):
        LongctxForCausalLM(LongctxConfig())


def test_window_grows_with_depth_shorthand():
    cfg = LongctxConfig(num_hidden_layers=4, window=64, window_schedule="grow", window_min=16)
    assert [p.window for p in cfg.layer_patterns()] == [16, 32, 48, 64]


def test_learned_positions_beyond_the_table_are_a_clear_error():
    model = LongctxModel(LongctxConfig(**SMALL | dict(max_position_embeddings=16, window=2)))
    with pytest.raises(LongctxError, match="max_position_embeddings=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_qa_preset_makes_the_question_global():
    from longctx.models import question_global_mask
    ids = torch.tensor([[1, 5, 6, 2, 9, 9, 2], [1, 5, 2, 9, 9, 9, 2]])
    assert question_global_mask(ids, 2).tolist() == [[True, True, True, False, False, False, False],
                                                      [True, True, False, False, False, False, False]]
    with pytest.raises(LongctxError, match="separator"):
        question_global_mask(torch.tensor([[1, 5, 6]]), 2)


@pytest.mark.parametrize("position", ["learned", "rope", "xpos"])
def test_position_ids_are_used_per_row(position):
    torch.manual_seed(0)
    model = LongctxModel(LongctxConfig(**SMALL, position=position)).eval()
    ids = torch.randint(3, 64, (2, 10))
    pos = torch.stack([torch.arange(10), torch.arange(5, 15)])
    with torch.no_grad():
        both = model(ids, position_ids=pos).last_hidden_state
        alone = [model(ids[b:b + 1], position_ids=pos[b]).last_hidden_state[0] for b in range(2)]
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], alone[1], atol=1e-5, rtol=1e-5)
    assert (both[1] - alone[0]).abs().max() > 1e-3  # row 1 did not get row 0's positions


def test_left_padded_batch_equals_hugging_face_longformer():
    """Positions follow the attention mask, as HF's Longformer (RoBERTa) numbers them: the Longformer
    parity setup (a converted random HF model), now with left padding."""
    from transformers import LongformerConfig, LongformerModel

    from longctx.convert import convert_longformer
    PAD = 1
    cfg = LongformerConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, attention_window=[4, 8], max_position_embeddings=2 + 128,
                           pad_token_id=PAD, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = LongformerModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            norm = "LayerNorm" in name
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if norm else 0.15) + (1.0 if norm and name.endswith(".weight") else 0.0))
    ours = convert_longformer(hf).eval()
    n = 24
    ids = torch.randint(3, 97, (3, n), generator=g)
    mask = torch.ones(3, n, dtype=torch.long)
    for b, pad in enumerate([0, 5, 11]):  # left padding
        ids[b, :pad], mask[b, :pad] = PAD, 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours.longctx(ids, attention_mask=mask).last_hidden_state if hasattr(ours, "longctx") else \
            ours(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("position", ["sinusoidal", "alibi"])
def test_fixed_position_tables_survive_save_and_load(tmp_path, position):
    """The sinusoidal table and ALiBi's slopes are not in the weights file; every loading path (here
    AutoModel, as users load) must rebuild them, not hand over uninitialised memory."""
    import transformers

    torch.manual_seed(0)
    cfg = LongctxConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        attention="sliding", window=4, position=position, causal=True, norm="pre",
                        max_position_embeddings=64, hidden_dropout_prob=0.0)
    model = LongctxForCausalLM(cfg).eval()
    ids = torch.randint(0, 40, (2, 30))
    want = model(ids).logits
    model.save_pretrained(tmp_path)
    for _ in range(2):  # uninitialised memory differs between loads; both must be right
        got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
