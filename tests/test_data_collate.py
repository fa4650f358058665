"""Collators: RoBERTa masking statistics, specials, labels, reproducibility, global presets, CLM, batch order."""
import math

import pytest
import torch

from longctx.data.collate import CLMCollator, MLMCollator, batch_order
from longctx.data.tokenizer import ByteTokenizer
from longctx.errors import LongctxError

TOK = ByteTokenizer()


def blocks(n=64, length=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (length,), generator=g)
        ids[torch.rand(length, generator=g) < 0.05] = TOK.sep_id  # document separators
        ids[0] = TOK.cls_id
        out.append({"input_ids": ids, "heading": torch.rand(length, generator=g) < 0.02})
    return out


def test_masking_rate_and_80_10_10_split_within_statistical_bounds():
    items = blocks()
    batch = MLMCollator(TOK, 0.15, seed=7)(items, batch_index=0)
    orig = torch.stack([e["input_ids"] for e in items])
    special = torch.isin(orig, torch.tensor(sorted(TOK.special_ids)))
    chosen = batch["labels"] != -100
    n = int((~special).sum())
    k = int(chosen.sum())
    assert abs(k / n - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n)
    assert not (chosen & special).any() and torch.equal(batch["input_ids"][special], orig[special])
    assert torch.equal(batch["labels"][chosen], orig[chosen])  # labels are the original tokens
    assert torch.equal(batch["input_ids"][~chosen], orig[~chosen])  # nothing else changes
    masked = (batch["input_ids"] == TOK.mask_id) & chosen
    randomised = (batch["input_ids"] != orig) & ~masked & chosen
    kept = (batch["input_ids"] == orig) & chosen
    p_random = 0.1 * (1 - 1 / 256)  # a random byte equals the original 1 time in 256
    for count, p in ((masked, 0.8), (randomised, p_random), (kept, 1 - 0.8 - p_random)):
        assert abs(int(count.sum()) / k - p) < 4 * math.sqrt(p * (1 - p) / k), (int(count.sum()) / k, p)
    assert not torch.isin(batch["input_ids"][randomised], torch.tensor(sorted(TOK.special_ids))).any()
    assert (batch["attention_mask"] == 1).all() and not batch["global_attention_mask"].any()


def test_same_seed_and_batch_index_give_the_same_batch():
    items = blocks(8, 512)
    c = MLMCollator(TOK, seed=3)
    a, b = c(items, batch_index=5), MLMCollator(TOK, seed=3)(items, batch_index=5)
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["labels"], c(items, batch_index=6)["labels"])
    assert not torch.equal(a["labels"], MLMCollator(TOK, seed=4)(items, batch_index=5)["labels"])
    assert not torch.equal(a["labels"], c(items, batch_index=5, rank=1)["labels"])


def test_global_presets_and_padding():
    items = blocks(2, 300)
    items.append({"input_ids": items[0]["input_ids"][:100], "heading": torch.ones(100, dtype=torch.bool)})
    first = MLMCollator(TOK, global_tokens="first")(items, batch_index=0)
    assert first["global_attention_mask"][:, 0].all() and first["global_attention_mask"].sum() == 3
    heads = MLMCollator(TOK, global_tokens="headings")(items, batch_index=0)
    assert torch.equal(heads["global_attention_mask"][0], items[0]["heading"])
    assert heads["global_attention_mask"][2, :100].all() and not heads["global_attention_mask"][2, 100:].any()
    assert heads["attention_mask"][2].tolist() == [1] * 100 + [0] * 200
    assert (heads["input_ids"][2, 100:] == TOK.pad_id).all() and (heads["labels"][2, 100:] == -100).all()
    padded = MLMCollator(TOK, pad_to_multiple_of=128)(items, batch_index=0)
    assert padded["input_ids"].shape == (3, 384)
    with pytest.raises(LongctxError, match="needs heading flags"):
        MLMCollator(TOK, global_tokens="headings")([{"input_ids": torch.arange(5)}], batch_index=0)
    with pytest.raises(LongctxError, match="'cls' is unknown"):
        MLMCollator(TOK, global_tokens="cls")


def test_clm_labels_are_inputs_with_padding_ignored():
    items = [{"input_ids": torch.arange(10)}, {"input_ids": torch.arange(4)}]
    b = CLMCollator(TOK)(items)
    assert b["labels"][0].tolist() == list(range(10))
    assert b["labels"][1].tolist() == [0, 1, 2, 3] + [-100] * 6
    assert b["input_ids"][1, 4:].eq(TOK.pad_id).all() and b["attention_mask"][1].tolist() == [1] * 4 + [0] * 6
    assert not b["global_attention_mask"].any()


def test_batch_order_is_a_function_of_seed_and_index_and_covers_each_epoch():
    n, bs = 37, 4
    epoch0 = [i for k in range(0, 9) for i in batch_order(n, bs, k, seed=1)] + batch_order(n, bs, 9, seed=1)[:1]
    assert sorted(epoch0) == list(range(n))
    assert batch_order(n, bs, 5, seed=1) == batch_order(n, bs, 5, seed=1) != batch_order(n, bs, 5, seed=2)
    r0, r1 = batch_order(n, bs, 3, 1, rank=0, world_size=2), batch_order(n, bs, 3, 1, rank=1, world_size=2)
    assert not set(r0) & set(r1)
    assert batch_order(10, 3, 1, 0, shuffle=False) == [3, 4, 5]


def _batches(data, collator, batch_size, seed, start, stop):
    """Batches k = start .. stop - 1 as the training loop builds them."""
    return [(k, collator([data[i] for i in batch_order(len(data), batch_size, k, seed)], batch_index=k))
            for k in range(start, stop)]


def test_resuming_at_batch_k_reproduces_the_uninterrupted_run():
    data = blocks(20, 64)
    full = _batches(data, MLMCollator(TOK, global_tokens="headings", seed=11), 3, 5, 0, 12)
    resumed = _batches(data, MLMCollator(TOK, global_tokens="headings", seed=11), 3, 5, 7, 12)
    for (_, a), (_, b) in zip(full[7:], resumed):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert not torch.equal(full[7][1]["input_ids"], full[8][1]["input_ids"])


def test_mlm_needs_a_mask_token():
    class NoMask:
        mask_id = None
    with pytest.raises(LongctxError, match="no mask token"):
        MLMCollator(NoMask())
