"""longctx attention inside Hugging Face models: ``attn_implementation="longctx"``.

Transformers 5 lets a library register an attention function (``AttentionInterface``) and the function
that builds its mask (``AttentionMaskInterface``); every layer of Mistral, Qwen2, Gemma 2/3, ModernBERT
and their kin calls them with ``sliding_window=`` on its local layers. This module registers both under
the name "longctx":

- the mask function returns a ``LongctxMask``: the key-padding flags and the absolute position of the
  first query and key. Nothing of size n x n is ever made; the pattern itself comes from the layer
  (``sliding_window``, ``is_causal``) when attention runs;
- the attention function runs sliding layers on longctx's blocked kernel (memory O(n * w)) and global
  layers on PyTorch's SDPA (or, for a causal layer with left padding, which SDPA could only take as an
  n x n mask, on the blocked kernel with the full causal pattern; right padding needs no mask causally).
  Backward runs on the same kernels: the band kernel's own (recomputing each block's probabilities) and
  SDPA's flash backward, so a training step holds nothing of size n x n either. A decoding step (few queries against the
  key-value cache) is a small dense product over the cached keys.

Hugging Face's ``sliding_window`` counts the query itself: flash-attention's convention, which every
model follows (ModernBERT passes ``config.sliding_window + 1`` for exactly that reason), so a query sees
keys within ``sliding_window - 1`` positions: our one-sided ``window``.

The key-value cache is Hugging Face's own: ``DynamicCache`` gives sliding layers a
``DynamicSlidingWindowLayer`` that keeps only the window, and tells the mask function the offsets of
what it returns.

Packed rows (several documents in one row, marked by ``position_ids`` that restart, as Hugging Face's
``DataCollatorWithFlattening`` makes them) keep their documents apart as eager and SDPA do: Hugging Face
says so only inside its mask function, so the mask function reads the document boundaries back from it,
and attention runs every document as a row of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longctx.attention import AttentionPattern, attention
from longctx.attention.functional import repeat_kv
from longctx.errors import LongctxError

NAME = "longctx"


@dataclass
class LongctxMask:
    """What the longctx attention needs to know about a batch instead of an n x n mask.

    key_valid: (B, kv_length) bool, True for real keys, or None when no key is padding;
    q_offset / kv_offset: absolute positions of the first query and the first key (they differ while
    decoding with a cache, and a sliding cache layer returns only the keys the window still reaches);
    documents: (B, n) long, each token's document within its row (0, 1, ...) when rows are packed, else None.
    """

    key_valid: torch.Tensor | None
    q_offset: int
    kv_offset: int
    documents: torch.Tensor | None = None


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def longctx_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask: torch.Tensor | None = None, use_vmap: bool = False, device=None, **kwargs):
    """The ``AttentionMaskInterface`` function: a ``LongctxMask`` (key padding and offsets), never n x n.

    ``use_vmap`` is how Hugging Face marks a mask built with custom ``or_mask_function`` /
    ``and_mask_function`` overlays (image tokens, blockwise groups): patterns that are not a window."""
    if use_vmap:
        raise LongctxError("attn_implementation 'longctx' runs causal, bidirectional and sliding-window masks; "
                           "this model adds a custom mask overlay, so use 'sdpa' for it")
    if isinstance(q_offset, torch.Tensor):  # static caches give a tensor offset
        q_offset = int(q_offset)
    key_valid = None
    if attention_mask is not None:
        key_valid = attention_mask.to(torch.bool)
        end = kv_offset + kv_length
        if key_valid.shape[-1] < end:  # a static cache's unfilled slots are not keys yet
            key_valid = F.pad(key_valid, (0, end - key_valid.shape[-1]), value=False)
        key_valid = key_valid[:, kv_offset:end]
        # no padding: say so, so the fast paths (SDPA's is_causal) stay open; never branch when tracing
        if not _is_tracing() and bool(key_valid.all()):
            key_valid = None
    documents = None
    if mask_function is not None and q_length == kv_length > 1 and q_offset == kv_offset == 0 and not _is_tracing():
        documents = _packed_documents(mask_function, batch_size, q_length, device)
    return LongctxMask(key_valid, q_offset, kv_offset, documents)


def _packed_documents(mask_function, batch_size: int, n: int, device) -> torch.Tensor | None:
    """(B, n) document index of every token, or None when every row is one document. Within a document a
    token always sees the token before it (causal, sliding and bidirectional patterns alike), across a
    packed boundary never, so that one link per token, asked of Hugging Face's mask function, finds them."""
    b = torch.arange(batch_size, device=device)[:, None]
    i = torch.arange(1, n, device=device)[None, :]
    linked = torch.as_tensor(mask_function(b, torch.zeros((), dtype=torch.long, device=device), i, i - 1),
                             device=device).expand(batch_size, n - 1)
    if bool(linked.all()):
        return None
    return F.pad((~linked).long().cumsum(-1), (1, 0))


def _backend(q: torch.Tensor) -> str:
    return "blocked" if q.device.type == "cpu" else "auto"


def longctx_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask, dropout: float = 0.0, scaling: float | None = None,
                              sliding_window: int | None = None, softcap: float | None = None,
                              is_causal: bool | None = None, **kwargs):
    """The ``AttentionInterface`` function. query (B, H, q, d), key/value (B, Hkv, kv, d) ->
    ((B, q, H, d), None): Hugging Face's signature (no attention weights are ever formed)."""
    if softcap is not None:
        raise LongctxError("attn_implementation 'longctx' has no attention logit soft-capping; set "
                           "attn_logit_softcapping=None in the config or use 'eager'")
    if dropout:
        raise LongctxError("attn_implementation 'longctx' has no attention dropout; set attention_dropout=0 "
                           "or train with 'sdpa'")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise LongctxError("attn_implementation 'longctx' has no attention sinks; use 'eager' for this model")
    if attention_mask is not None and not isinstance(attention_mask, LongctxMask):
        raise LongctxError("attn_implementation 'longctx' got a ready-made 4D attention mask; pass a 2D "
                           "padding mask (1 = token, 0 = padding) instead")
    mask = attention_mask or LongctxMask(None, 0, 0)
    query, key, value = (_own_storage(x) for x in _common_dtype(query, key, value))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: longctx's attention takes the key heads
    # HF's sliding_window counts the query itself (see the module docstring): one-sided window = w - 1
    pattern = (AttentionPattern("full", causal=causal) if sliding_window is None
               else AttentionPattern("sliding", window=sliding_window - 1, causal=causal))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask.documents is not None:
        out = _documents_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), pattern, mask, scale)
    elif q_len == kv_len and mask.q_offset == mask.kv_offset:
        out = _self_attention(query, key, value, pattern, mask.key_valid, scale)
    else:
        out = _step_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), pattern, mask, scale)
    return out.transpose(1, 2).contiguous(), None


def _common_dtype(q, k, v):
    """q, k, v in one dtype, as longctx's kernels take them: under autocast the autocast dtype (what eager's
    products and SDPA run in there; a model's rotary embedding can leave q and k in fp32 beside a bf16 v),
    else the query's."""
    dev = q.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    return tuple(x if x.dtype == dtype else x.to(dtype) for x in (q, k, v))


def _own_storage(x: torch.Tensor) -> torch.Tensor:
    """x itself, or, where x is a slice of a larger buffer and training will keep it for backward, a compact
    copy of it (same values, laid out (B, n, H, d) as a layer's own projections are, which both band
    kernels and SDPA read as they are). ModernBERT-style layers split q, k, v out of one fused projection
    (``Wqkv``, 3 x (B, n, H, d)): the rotary embedding makes q and k new tensors, but v stays a view, and an
    attention kernel that saves v for backward (the band kernel's, SDPA's flash) keeps the whole buffer
    alive, three times v's size, until backward reaches the layer. Nothing else holds that buffer, so the
    copy frees two thirds of it: 64 MB per layer at 16,384 tokens and hidden 512 (docs/benchmarks.md)."""
    if not (x.requires_grad and torch.is_grad_enabled()) or x.dim() != 4 or _is_tracing():
        return x
    if x.untyped_storage().nbytes() <= 1.25 * x.numel() * x.element_size():
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _self_attention(q, k, v, pattern: AttentionPattern, key_valid, scale: float) -> torch.Tensor:
    """Queries and keys are the same positions (an encoder, a prefill): q (B, H, n, d), k and v (B, Hkv, n, d)."""
    if pattern.kind == "sliding" and q.shape[2] - 1 <= pattern.window:  # the window spans the input: it is full
        pattern = AttentionPattern("full", causal=pattern.causal)
    if pattern.kind == "sliding":
        return attention(q, k, v, pattern, key_padding_mask=key_valid, scale=scale, backend=_backend(q))
    def sdpa(**kw):  # SDPA gets one key head per query head (its enable_gqa needs torch 2.5)
        groups = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), scale=scale, **kw)

    if key_valid is None:
        return sdpa(is_causal=pattern.causal)
    if not pattern.causal:  # key padding broadcasts as (B, 1, 1, n): no n x n mask
        return sdpa(attn_mask=key_valid[:, None, None, :])
    if not _is_tracing() and _right_padded(key_valid):
        # padding only at the ends of rows: a real query never reaches a padded key causally, so SDPA's
        # causal kernel (flash, forward and backward) gives every real position the same result; padded
        # positions' outputs are garbage under every implementation, and no real position reads them
        return sdpa(is_causal=True)
    # causal with left or inner padding: SDPA would need the n x n mask; the blocked kernel needs none
    return attention(q, k, v, pattern, key_padding_mask=key_valid, scale=scale, backend=_backend(q))


def _right_padded(key_valid: torch.Tensor) -> bool:
    """Every row is its real keys first, then only padding."""
    n = key_valid.shape[-1]
    first = torch.arange(n, device=key_valid.device) < key_valid.sum(-1, keepdim=True)
    return bool(torch.equal(key_valid, first))


def _documents_attention(q, k, v, pattern: AttentionPattern, mask: LongctxMask, scale: float) -> torch.Tensor:
    """Packed rows: every document becomes a row of its own (padded to the longest document), so no
    query reaches another document's keys; (B, H, n, d) in and out."""
    B, H, n, d = q.shape
    per_row = mask.documents[:, -1] + 1
    docs = mask.documents + (torch.cumsum(per_row, 0) - per_row)[:, None]  # numbered across the batch
    lengths = torch.bincount(docs.flatten())  # documents are contiguous in the flattened rows
    starts = torch.cumsum(lengths, 0) - lengths
    steps = torch.arange(int(lengths.max()), device=q.device)
    valid = steps[None, :] < lengths[:, None]  # (D, L)
    index = torch.where(valid, starts[:, None] + steps[None, :], starts[:, None])

    def unpack(x):  # (B, H, n, d) -> (D, H, L, d)
        return x.transpose(1, 2).reshape(B * n, H, d)[index].transpose(1, 2)

    key_valid = valid if mask.key_valid is None else valid & mask.key_valid.reshape(-1)[index]
    out = _self_attention(unpack(q), unpack(k), unpack(v), pattern, None if bool(key_valid.all()) else key_valid,
                          scale)
    packed = out.new_zeros(B * n, H, d)
    packed[index[valid]] = out.transpose(1, 2)[valid]
    return packed.view(B, n, H, d).transpose(1, 2)


def _step_attention(q, k, v, pattern: AttentionPattern, mask: LongctxMask, scale: float) -> torch.Tensor:
    """A decoding step: q (B, H, t, d) at positions q_offset.., over the cached keys at kv_offset..; the
    (t, kv) mask is small, since a sliding cache layer holds only the window."""
    t, m = q.shape[2], k.shape[2]
    q_pos = torch.arange(t, device=q.device).view(t, 1) + mask.q_offset
    k_pos = torch.arange(m, device=q.device).view(1, m) + mask.kv_offset
    allowed = pattern.local_allowed(q_pos, k_pos).view(1, 1, t, m)
    if mask.key_valid is not None:
        allowed = allowed & mask.key_valid[:, None, None, :]
    has_any = allowed.any(-1, keepdim=True)  # a row with no key gives zeros, not NaN
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_any, scale=scale)
    return out * has_any.to(out.dtype)


def register() -> None:
    """Register "longctx" with Hugging Face's attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, longctx_attention_forward)
    AttentionMaskInterface.register(NAME, longctx_mask)
