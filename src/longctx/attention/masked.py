"""The mask family as mechanisms: full, sliding (per-head dilation), blocks, blockwise_causal.

Each is an ``AttentionPattern`` (a predicate, patterns.py) run by ``attention()`` (functional.py): the
dense reference, the blocked CPU kernel, SDPA or FlexAttention, all from the predicate composed with
padding, global tokens and causality in one place (``patterns.compose``). Causality comes from the
model (``LayerContext.causal``); ``blockwise_causal`` is causal by definition.

A score bias (ALiBi) arrives as the ``bias`` callable; the kernels take a linear distance bias natively
(its ``slopes``), and any other callable runs on the dense reference. Which kernel runs is the
dispatcher's choice (``dispatch.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longctx.attention.functional import attention, attention_at
from longctx.attention.mechanism import Capabilities, LayerCache, LayerContext, Mechanism, register
from longctx.attention.patterns import AttentionPattern, full_mask
from longctx.attention.reference import dense_attention, masked_softmax
from longctx.errors import LongctxError


@dataclass(frozen=True)
class NoSpec:
    pass


@dataclass(frozen=True)
class SlidingSpec:
    window: int = 64              # one-sided: a token sees w keys each side (Longformer's attention_window = 2w)
    dilation: int | tuple = 1     # one int, or one per head (Longformer's dilated heads)

    def __post_init__(self):
        if isinstance(self.dilation, list):
            object.__setattr__(self, "dilation", tuple(self.dilation))
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise ValueError(f"window must be an integer >= 0, got {self.window!r}")


@dataclass(frozen=True)
class BlockSpec:
    block: int = 256              # block size b

    def __post_init__(self):
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise ValueError(f"block must be an integer >= 1, got {self.block!r}")


class MaskMechanism(Mechanism):
    """A mask pattern: subclasses say how their Spec becomes an ``AttentionPattern``."""

    supports = Capabilities(causal=True, global_tokens=True, cache=True, score_bias=True,
                            global_projections=True)
    kernel_route = "mask"  # attention()'s kernels (dispatch.py)

    def __init__(self, spec, ctx: LayerContext):
        super().__init__(spec, ctx)
        try:
            self.pattern = self.make_pattern(spec, ctx.causal)
            self.pattern.head_dilations(ctx.num_heads)  # a per-head dilation list must match the heads
        except LongctxError as e:
            raise LongctxError(f"attention {self.name!r}: {e}") from None

    @staticmethod
    def make_pattern(spec, causal: bool) -> AttentionPattern:
        raise NotImplementedError

    # -- the fast path --------------------------------------------------------------------------------
    def forward(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None, cache=None,
                global_qkv=None):
        slopes, score_bias = _bias_parts(bias)
        slopes = None if slopes is None else slopes.to(q.dtype)
        if cache is not None:
            return self._cached(q, k, v, positions, slopes, cache)
        # the kernel is the dispatcher's choice (a general score bias: the dense reference)
        return attention(q, k, v, self.pattern, key_padding_mask=key_padding, global_mask=global_mask,
                         global_qkv=global_qkv, alibi_slopes=slopes, score_bias=score_bias,
                         backend=self.ctx.backend, mechanism=self.name)

    def _cached(self, q, k, v, positions, slopes, cache: LayerCache):
        """Generation: new tokens at ``positions`` attend to the cached keys too; the cache keeps only
        the keys the pattern can still reach (its cache rule, ``min_visible_key``)."""
        if len(cache) == 0:  # prefill: the fast kernel over the prompt
            out = attention(q, k, v, self.pattern, alibi_slopes=slopes, backend=self.ctx.backend,
                            mechanism=self.name)
        else:
            out = attention_at(q, torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2), positions,
                               torch.cat([cache.pos, positions]), self.pattern, alibi_slopes=slopes)
        cache.extend(k, v, positions, self.pattern.min_visible_key(int(positions[-1]) + 1, self.ctx.num_heads))
        return out

    # -- the oracle -------------------------------------------------------------------------------------
    def reference(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None,
                  global_qkv=None):
        slopes, score_bias = _bias_parts(bias)
        return dense_attention(q, k, v, self.pattern, key_padding_mask=key_padding, global_mask=global_mask,
                               global_qkv=global_qkv, alibi_slopes=slopes, score_bias=score_bias)

    def mask(self, n, key_padding=None, global_mask=None, device=None):
        return full_mask(self.pattern, n, self.ctx.num_heads, key_padding, global_mask, device=device)

    def attention_map(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        n = q.shape[2]
        pos = torch.arange(n, device=q.device)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        if bias is not None:
            scores = scores + bias(pos, pos).to(scores.dtype)
        return masked_softmax(scores, self.mask(n, key_padding, global_mask, q.device))

    def flops(self, n: int, num_global: int = 0) -> float:
        """4 d per attended pair (QK^T and PV), all heads; the G global rows and columns on top of the
        local pairs (their overlap with the pattern counted once more: an upper bound by at most 2 G w)."""
        H, d = self.ctx.num_heads, self.ctx.head_dim
        pairs = self.pattern.attended_pairs(n, H)
        if num_global:
            pairs = min(n * n, pairs + 2 * num_global * n - num_global * num_global)
        return 4.0 * d * H * pairs

    def describe(self) -> str:
        p = self.pattern
        s = p.kind + (f" w={p.window}" if p.kind == "sliding" else "") + (f" b={p.block}" if p.block else "")
        if p.dilation not in (1, (1,)):
            s += f" d={p.dilation}"
        return s


def _bias_parts(bias):
    """(ALiBi slopes for the kernels, a general bias callable or None). A bias callable with a ``slopes``
    attribute is linear in |i - j| (ALiBi) and runs on every kernel; any other callable needs the dense
    reference (the dispatcher sends it there)."""
    if bias is None:
        return None, None
    slopes = getattr(bias, "slopes", None)
    if slopes is not None:
        return slopes, None
    return None, bias


@register
class Full(MaskMechanism):
    name = "full"
    Spec = NoSpec

    @staticmethod
    def make_pattern(spec, causal):
        return AttentionPattern("full", causal=causal)


@register
class Sliding(MaskMechanism):
    name = "sliding"
    Spec = SlidingSpec
    examples = {"test": {"window": 3, "dilation": [1, 2]}}

    @staticmethod
    def make_pattern(spec, causal):
        return AttentionPattern("sliding", window=spec.window, dilation=spec.dilation, causal=causal)


@register
class Blocks(MaskMechanism):
    name = "blocks"
    Spec = BlockSpec
    examples = {"test": {"block": 8}}

    @staticmethod
    def make_pattern(spec, causal):
        return AttentionPattern("blocks", block=spec.block, causal=causal)


@register
class BlockwiseCausal(MaskMechanism):
    name = "blockwise_causal"
    Spec = BlockSpec
    examples = {"test": {"block": 8}}

    @staticmethod
    def make_pattern(spec, causal):
        return AttentionPattern("blockwise_causal", block=spec.block, causal=True)


def pattern_fields(pattern: AttentionPattern) -> tuple[str, dict]:
    """An ``AttentionPattern`` as a registry entry: (type, fields)."""
    if pattern.kind == "sliding":
        return "sliding", {"window": pattern.window, "dilation": pattern.dilation}
    if pattern.kind in ("blocks", "blockwise_causal"):
        return pattern.kind, {"block": pattern.block}
    return "full", {}
