"""attn_implementation="longctx" inside Hugging Face models, against the same models' eager attention.

Tiny random configs of ModernBERT, Mistral, Qwen2, Gemma 2 and Gemma 3 are built here (nothing is downloaded),
with windows small enough that the window cuts at the test length (sliding_window 8 at 40 tokens); the
oracle is Hugging Face's own eager attention, which builds the full n x n mask.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig,
                          MistralForCausalLM, ModernBertConfig, ModernBertModel, Qwen2Config, Qwen2ForCausalLM)

import longctx  # noqa: F401  (registers "longctx")
import longctx.hf.attention_interface as interface
from longctx.errors import LongctxError
from longctx.hf import LongctxMask, longctx_mask

N, WINDOW = 40, 8
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=128)


def _configs():
    return {
        "mistral": (MistralForCausalLM, MistralConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2,
                                                      sliding_window=WINDOW)),
        # Qwen2: the first layer full, the others sliding (max_window_layers)
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SMALL, num_hidden_layers=3, num_key_value_heads=2,
                                                use_sliding_window=True, sliding_window=WINDOW,
                                                max_window_layers=1)),
        # Gemma 2: sliding and global layers interleaved; soft-capping is not a longctx feature
        "gemma2": (Gemma2ForCausalLM, Gemma2Config(**SMALL, num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
                                                   sliding_window=WINDOW, attn_logit_softcapping=None)),
        # Gemma 3: sliding and global layers, query-key norms, no soft-capping
        "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
                                                       sliding_window=WINDOW,
                                                       layer_types=["sliding_attention", "full_attention"])),
        # ModernBERT: global every third layer, local_attention 2 * WINDOW (one-sided window WINDOW)
        "modernbert": (ModernBertModel, ModernBertConfig(**SMALL, num_hidden_layers=3, local_attention=2 * WINDOW,
                                                         global_attn_every_n_layers=3, pad_token_id=0,
                                                         bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                                         sep_token_id=2)),
    }


def _pair(name, impl="longctx"):
    """The same random weights twice: one model with eager attention, one with ``impl``."""
    cls, cfg = _configs()[name]
    torch.manual_seed(0)
    eager = cls(copy.deepcopy(cfg))
    eager.set_attn_implementation("eager")
    other = cls(copy.deepcopy(cfg))
    other.load_state_dict(eager.state_dict())
    other.set_attn_implementation(impl)
    return eager.eval(), other.eval()


def _padding(side: str) -> torch.Tensor:
    mask = torch.ones(2, N, dtype=torch.long)
    if side == "right":
        mask[1, 29:] = 0
    elif side == "left":
        mask[1, :11] = 0
    return mask


def _last_hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the patterns the integration hands to longctx's attention() on the blocked backend, to
    show the sliding layers really run there (the kernel itself is held to the dense reference elsewhere)."""
    calls = []
    real = interface.attention

    def spy(q, k, v, pattern, **kwargs):
        calls.append((pattern, kwargs.get("backend")))
        return real(q, k, v, pattern, **kwargs)

    monkeypatch.setattr(interface, "attention", spy)
    return calls


@pytest.mark.parametrize("side", ["none", "right", "left"])
@pytest.mark.parametrize("name", ["modernbert", "mistral", "qwen2", "gemma2", "gemma3"])
def test_hidden_states_equal_eager(name, side, kernel_calls):
    eager, ours = _pair(name)
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, N))
    mask = _padding(side)
    he, hl = _last_hidden(eager, ids, mask), _last_hidden(ours, ids, mask)
    real = mask.bool()  # padded positions are garbage under every implementation
    assert (he - hl)[real].abs().max().item() < 1e-5
    # the sliding layers ran on the blocked kernel with the one-sided window the model means
    assert any(p.kind == "sliding" and p.window == WINDOW - (name != "modernbert") and backend == "blocked"
               for p, backend in kernel_calls)

    # the window cuts at this length: without it the same weights give other outputs
    cls, cfg = _configs()[name]
    cfg = copy.deepcopy(cfg)
    cfg.sliding_window, cfg._attn_implementation = 1000, "eager"
    wide = cls(cfg).eval()
    wide.load_state_dict(eager.state_dict())
    assert (_last_hidden(wide, ids, mask) - he)[real].abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma2", "gemma3"])
def test_greedy_generation_equals_eager(name):
    eager, ours = _pair(name)
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generation pads
    kw = dict(attention_mask=mask, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ge, gl = eager.generate(ids, **kw), ours.generate(ids, **kw)
    assert gl.sequences.shape == (2, 52)
    assert torch.equal(ge.sequences, gl.sequences)
    for le, ll in zip(ge.logits, gl.logits):
        assert (le - ll).abs().max().item() < 1e-4
    # Hugging Face's cache keeps only the window on the sliding layers (52 tokens were seen)
    cache = gl.past_key_values
    kinds = [getattr(layer, "is_sliding", False) for layer in cache.layers]
    assert any(kinds)
    for layer, sliding in zip(cache.layers, kinds):
        held = layer.keys.shape[-2]
        assert held == (WINDOW - 1 if sliding else 51)


def test_mask_is_never_n_by_n():
    """The mask function returns key flags and offsets, not an (n x n) mask, and drops an all-ones mask."""
    am = torch.ones(2, 5000, dtype=torch.long)
    am[0, -7:] = 0
    m = longctx_mask(2, 5000, 5000, attention_mask=am)
    assert isinstance(m, LongctxMask) and m.key_valid.shape == (2, 5000)
    assert torch.equal(m.key_valid, am.bool())
    assert longctx_mask(2, 5000, 5000, attention_mask=torch.ones(2, 5000)).key_valid is None
    # a sliding cache layer returns its last keys: the flags are those of the keys it returns
    m = longctx_mask(2, 8, 8, q_offset=20, kv_offset=13, attention_mask=am[:, :21])
    assert m.key_valid is None and (m.q_offset, m.kv_offset) == (20, 13)


def test_from_pretrained_and_clear_errors(tmp_path):
    eager, _ = _pair("mistral")
    eager.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="longctx")
    assert loaded.config._attn_implementation == "longctx"
    ids = torch.randint(3, 97, (1, N))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, eager(ids).logits, atol=1e-5)

    cls, cfg = _configs()["gemma2"]
    cfg = copy.deepcopy(cfg)
    cfg.attn_logit_softcapping = 50.0
    model = cls(cfg)
    model.set_attn_implementation("longctx")
    with pytest.raises(LongctxError, match="soft-capping"):
        model(ids)


@pytest.mark.slow
def test_bench_hf_case_runs(tmp_path):
    """`longctx bench hf` (the memory comparison lives there, not in a timed test) runs a case end to end."""
    import json

    from longctx.cli import main
    out = tmp_path / "bench"
    assert main(["bench", "hf", "--lengths", "64", "--models", "modernbert", "--impl", "longctx", "--layers", "1",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [c["status"] for c in result["cases"]] == ["ok"] and result["cases"][0]["peak_bytes"] >= 0
    assert "modernbert" in (out / "results.md").read_text()


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma3"])
def test_packed_documents_stay_apart(name, kernel_calls):
    """Documents packed in one row (position_ids restarting, Hugging Face's packed format, no attention
    mask) attend only themselves: each equals the document run alone, and the packed rows equal eager's."""
    eager, ours = _pair(name)
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (2, N))
    splits = [(17, 23), (10, 12, 18)]  # documents longer and shorter than the window
    pos = torch.stack([torch.cat([torch.arange(k) for k in row]) for row in splits])
    with torch.no_grad():
        packed = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert (packed - eager(input_ids=ids, position_ids=pos, use_cache=False).logits).abs().max() < 1e-5
        for row, lengths in enumerate(splits):
            start = 0
            for k in lengths:
                alone = ours(input_ids=ids[row:row + 1, start:start + k], use_cache=False).logits[0]
                assert (packed[row, start:start + k] - alone).abs().max().item() < 1e-5
                start += k
    assert any(p.kind == "sliding" and backend == "blocked" for p, backend in kernel_calls)
