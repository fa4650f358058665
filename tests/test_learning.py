"""Tiny models learn small synthetic long-range tasks on CPU: the loss falls far below chance."""
import pytest
import math

import torch

from longctx.models import LongctxConfig, LongctxForCausalLM, LongctxForMaskedLM

N_CLASSES = 8


def _copy_batch(g, batch=32, n=96):
    """Token 0 holds one of N_CLASSES values; the last position must predict it (distance n - 1)."""
    ids = torch.randint(N_CLASSES + 4, 60, (batch, n), generator=g)
    ids[:, 0] = torch.randint(4, 4 + N_CLASSES, (batch,), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, 0]
    ids[:, -1] = 3  # <mask>
    return ids, labels


def _train_copy(global_first: bool, steps=150):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = LongctxConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        window=4, max_position_embeddings=128, hidden_dropout_prob=0.0)
    model = LongctxForMaskedLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        ids, labels = _copy_batch(g)
        glob = torch.zeros_like(ids, dtype=torch.bool)
        glob[:, 0] = global_first
        loss = model(ids, global_attention_mask=glob, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


@pytest.mark.slow
def test_encoder_copies_a_distant_token_through_a_global_token():
    chance = math.log(N_CLASSES)
    with_global = _train_copy(True)
    assert with_global < 0.1 * chance, with_global
    # the same model without the global token cannot see 95 positions back (2 layers x window 4)
    without = _train_copy(False, steps=60)
    assert without > 0.8 * chance, without


@pytest.mark.slow
def test_decoder_learns_a_periodic_sequence_within_its_window():
    """x[t] = x[t - 8]: after the first period every token is predictable from 8 back (window 10)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    V, period = 32, 8
    cfg = LongctxConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, window=10,
                        causal=True, norm="pre", position="rope", hidden_dropout_prob=0.0)
    model = LongctxForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        ids = torch.randint(0, V, (32, period), generator=g).repeat(1, 12)  # n = 96
        labels = ids.clone()
        labels[:, :period] = -100  # the first period is random
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * math.log(V), loss.item()
    # and generation continues the pattern
    model.eval()
    prompt = torch.randint(0, V, (4, period), generator=g).repeat(1, 2)
    out = model.generate(prompt, max_new_tokens=24)
    assert torch.equal(out[:, 16:], prompt[:, :period].repeat(1, 3))
