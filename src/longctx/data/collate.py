"""Batches: which blocks go into batch k, and the MLM / CLM collators that turn them into tensors.

Reproducible by construction, for exact resume: everything random about batch ``k`` (the blocks it
holds and the masked positions) is a function of ``(seed, k, rank)`` alone, never of how many
batches came before in this process. The training loop (longctx.train) does::

    data = prepare_data(...)                              # longctx.data.packing
    train = PackedDataset(data.train, seq_len)
    collator = MLMCollator(data.tokenizer, 0.15, global_tokens="headings", seed=seed)
    for k in range(resumed_step, steps):                  # k = the global batch (optimizer micro-step) index
        idx = batch_order(len(train), batch_size, k, seed, rank, world_size)
        batch = collator([train[i] for i in idx], batch_index=k, rank=rank)
        loss = model(**batch).loss ...

and store only ``k`` (the data position) in a checkpoint; ``start=k + 1`` on resume continues with
exactly the batches an uninterrupted run would have seen. With gradient accumulation count ``k`` in
micro-batches. Calling the collator directly: ``collator(examples, batch_index=k, rank=rank)``.

Output of both collators (torch tensors, shape ``[batch, length]``): ``input_ids`` (long),
``attention_mask`` (long 1/0; all ones for packed blocks, 0 on padding when items differ in
length), ``global_attention_mask`` (bool), ``labels`` (long, -100 where no loss).

- ``MLMCollator``: RoBERTa dynamic masking: each non-special, non-padding token is chosen with
  probability ``mlm_probability``; of the chosen, 80% become the mask token, 10% a random non-special
  token, 10% stay; ``labels`` hold the original id at chosen positions. ``global_tokens``: ``"none"``
  (all False), ``"first"`` (token 0 of each row, the Longformer classification preset) or
  ``"headings"`` (the items' ``heading`` flags, StructFormer).
- ``CLMCollator``: ``labels = input_ids`` with -100 on padding (the model shifts them);
  ``global_attention_mask`` all False.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from longctx.errors import LongctxError

GLOBAL_TOKENS = ("none", "first", "headings")


EVAL_BATCH_OFFSET = 10**9  # batch indices of evaluation batches, far from any training batch index


def batch_seed(seed: int, batch_index: int, rank: int = 0, purpose: str = "mask") -> int:
    """A 63-bit seed derived from ``(seed, batch_index, rank, purpose)`` only."""
    h = hashlib.blake2b(f"{purpose}|{seed}|{batch_index}|{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _pad(examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None):
    lengths = [len(e["input_ids"]) for e in examples]
    if not examples or min(lengths) == 0:
        raise ValueError("cannot collate an empty batch or an empty item")
    length = max(lengths)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    heading = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, (e, n) in enumerate(zip(examples, lengths)):
        ids[row, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        attention[row, :n] = 1
        if "heading" in e:
            heading[row, :n] = torch.as_tensor(e["heading"], dtype=torch.bool)
    return ids, attention, heading


class MLMCollator:
    """RoBERTa-style dynamic masking with a global-attention preset (see the module doc)."""

    def __init__(self, tokenizer, mlm_probability: float = 0.15, global_tokens: str = "none", seed: int = 0,
                 pad_to_multiple_of: int | None = None, eval_seed: int | None = None):
        if tokenizer.mask_id is None:
            raise LongctxError("the tokenizer has no mask token, which masked-LM training needs; use a tokenizer "
                               "with [MASK] or <mask> (e.g. 'bytes' or a trained one).")
        if global_tokens not in GLOBAL_TOKENS:
            raise LongctxError(f"global_tokens '{global_tokens}' is unknown; use one of {', '.join(GLOBAL_TOKENS)}.")
        if not 0 < mlm_probability < 1:
            raise LongctxError(f"mlm_probability {mlm_probability} is outside (0, 1); use e.g. 0.15.")
        self.tokenizer, self.mlm_probability, self.global_tokens, self.seed = tokenizer, mlm_probability, global_tokens, seed
        # held-out batches are masked from the data's seed: runs with other training seeds score the same tokens
        self.eval_seed = seed if eval_seed is None else eval_seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.sep_id
        self.mask_id = tokenizer.mask_id
        self.special = torch.tensor(sorted(tokenizer.special_ids | {self.pad_id}), dtype=torch.long)
        self.random_ids = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in tokenizer.special_ids],
                                       dtype=torch.long)

    def __call__(self, examples: Sequence[dict], batch_index: int, rank: int = 0) -> dict[str, torch.Tensor]:
        ids, attention, heading = _pad(examples, self.pad_id, self.pad_to_multiple_of)
        if self.global_tokens == "headings" and any("heading" not in e for e in examples):
            raise LongctxError("global_tokens 'headings' needs heading flags in each item; pack the corpus with "
                               "longctx.data.packing (documents with 'structure').")
        seed = self.eval_seed if batch_index >= EVAL_BATCH_OFFSET else self.seed
        g = torch.Generator().manual_seed(batch_seed(seed, batch_index, rank))
        # every draw has the batch's full shape, so the draws do not depend on the values
        chosen = torch.rand(ids.shape, generator=g) < self.mlm_probability
        kind = torch.rand(ids.shape, generator=g)
        replacement = self.random_ids[torch.randint(len(self.random_ids), ids.shape, generator=g)]
        chosen &= ~torch.isin(ids, self.special) & attention.bool()
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        inputs = torch.where(chosen & (kind < 0.8), torch.full_like(ids, self.mask_id), ids)
        inputs = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), replacement, inputs)
        return {"input_ids": inputs, "attention_mask": attention,
                "global_attention_mask": _global_mask(self.global_tokens, attention, heading), "labels": labels}


class CLMCollator:
    """Causal LM batches: ``labels = input_ids`` (-100 on padding); no randomness."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.sep_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict], batch_index: int = 0, rank: int = 0) -> dict[str, torch.Tensor]:
        ids, attention, _ = _pad(examples, self.pad_id, self.pad_to_multiple_of)
        labels = torch.where(attention.bool(), ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "attention_mask": attention,
                "global_attention_mask": torch.zeros_like(ids, dtype=torch.bool), "labels": labels}


def _global_mask(kind: str, attention: torch.Tensor, heading: torch.Tensor) -> torch.Tensor:
    if kind == "first":
        g = torch.zeros_like(heading)
        g[:, 0] = True
    elif kind == "headings":
        g = heading.clone()
    else:
        g = torch.zeros_like(heading)
    return g & attention.bool()


def batch_order(n_items: int, batch_size: int, batch_index: int, seed: int, rank: int = 0,
                world_size: int = 1, shuffle: bool = True) -> list[int]:
    """The dataset indices of ``rank``'s part of global batch ``batch_index``.

    The data is an endless sequence of epochs, each a permutation seeded by ``(seed, epoch)``; global
    batch k takes positions ``[k*B*W, (k+1)*B*W)`` of it (B = batch_size, W = world_size) and rank r
    the r-th slice of B. ``shuffle=False`` walks the items in order (evaluation).
    """
    if n_items < 1 or batch_size < 1:
        raise ValueError("batch_order needs at least one item and a positive batch size")
    first = (batch_index * world_size + rank) * batch_size
    out, perm, perm_epoch = [], None, -1
    for p in range(first, first + batch_size):
        epoch, j = divmod(p, n_items)
        if not shuffle:
            out.append(j)
            continue
        if epoch != perm_epoch:
            g = torch.Generator().manual_seed(batch_seed(seed, epoch, 0, "order"))
            perm, perm_epoch = torch.randperm(n_items, generator=g), epoch
        out.append(int(perm[j]))
    return out

