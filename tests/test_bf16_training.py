"""bf16 autocast training (``train.bf16=true``) against fp32: the same model, seed and batches, trained far
enough to learn something a unigram model cannot, reach the same held-out loss (issue 27: within 1% on a
short pretraining run; docs/benchmarks.md has the measurement on the default comparison's config).

The task is learnable from context without a sharp phase change, so that two runs which differ only in
rounding end in the same place: every row draws one of 8 topics, each topic owns 8 of the 64 ids, and a
token is one of its topic's ids (90%) or any id (10%). The unigram loss of a masked token is log 64 = 4.16
nats; a model that reads the topic off the neighbouring tokens reaches the topic's entropy, 2.54. A chain
task (token t+1 a function of token t) was tried first: its loss drops when attention locks onto the
previous position, at a step that moves with the rounding, so held-out losses of fp32 and bf16 runs
differed by up to 10% mid-way, from chaos rather than precision.

Measured (300 AdamW steps, lr 3e-3 with warm-up and linear decay, the fused band kernel, 1 thread, seeds 0-4):
fp32 2.569-2.791, bf16 within 5e-4 relative of fp32 for every seed (4 of 5 within 1e-4). The bound held
here is the issue's 1%: 20 times the largest measured difference, and still a fraction of the 1.6 nats the
runs gain over the unigram level, which the test checks they gain.
"""
from __future__ import annotations

import math

import pytest
import torch

from longctx.models import LongctxConfig, LongctxForMaskedLM

V, TOPICS, N, BATCH, STEPS, LR = 64, 8, 128, 8, 300, 3e-3
MASK_ID, OFFSET = 4, 5  # ids 0-4 are special tokens; the task's ids are 5..68


def _batch(g: torch.Generator, owned: torch.Tensor):
    topic = torch.randint(TOPICS, (BATCH,), generator=g)
    pick = owned[topic].gather(1, torch.randint(V // TOPICS, (BATCH, N), generator=g))
    noise = torch.rand(BATCH, N, generator=g) < 0.1
    ids = torch.where(noise, torch.randint(V, (BATCH, N), generator=g), pick) + OFFSET
    chosen = torch.rand(BATCH, N, generator=g) < 0.15
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return ids.masked_fill(chosen, MASK_ID), labels


def _train(bf16: bool, seed: int = 0) -> tuple[float, torch.dtype]:
    """Held-out loss (fp32 evaluation, 4 batches) after STEPS steps, and the dtype of the training logits."""
    torch.manual_seed(seed)
    cfg = LongctxConfig(vocab_size=V + OFFSET, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, window=8, max_position_embeddings=N, attention="sliding",
                        attention_backend="blocked", hidden_dropout_prob=0.0)
    model = LongctxForMaskedLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / STEPS))
    g = torch.Generator().manual_seed(seed)
    owned = torch.randperm(V, generator=g).view(TOPICS, V // TOPICS)
    for _ in range(STEPS):
        ids, labels = _batch(g, owned)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        sched.step()
    model.eval()
    held = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        loss = sum(float(model(input_ids=i, labels=lab).loss) for i, lab in (_batch(held, owned) for _ in range(4)))
    return loss / 4, out.logits.dtype


@pytest.mark.slow
def test_bf16_training_reaches_fp32_heldout_loss(cpp_extension):
    from longctx.attention import dispatch

    assert dispatch.prepare_fused()  # the band layers run on the fused kernel, its bf16 products included
    fp32, dt32 = _train(bf16=False)
    bf16, dt16 = _train(bf16=True)
    assert dt32 == torch.float32 and dt16 == torch.bfloat16  # the bf16 run did compute in bf16
    unigram = math.log(V)
    for loss in (fp32, bf16):
        assert loss < unigram - 1.0, (fp32, bf16, unigram)  # learned the topics, not only the id frequencies
    assert abs(bf16 - fp32) <= 0.01 * fp32, (fp32, bf16)
