"""The attention layer used by every longctx model: projections, pattern, positions, kernel.

With ``global_projections`` the layer has Longformer's second set of projections (query_global,
key_global, value_global): global queries are computed with them against global keys/values of every
token, exactly as Hugging Face's ``LongformerSelfAttention`` does, while all other queries use the local
projections (and see the global tokens through the local keys).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longctx.attention.functional import attention, attention_at
from longctx.attention.patterns import AttentionPattern
from longctx.errors import LongctxError
from longctx.positions import POSITION_KINDS, Rotary, alibi_slopes


@dataclass
class LayerCache:
    """Keys and values of past positions for one layer, trimmed to what the pattern can still reach."""

    k: torch.Tensor | None = None  # (B, H, m, d), positions already applied
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # (m,)

    def __len__(self) -> int:
        return 0 if self.pos is None else self.pos.numel()

    def extend(self, k, v, pos, keep_from: int) -> None:
        if self.k is not None:
            k, v, pos = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2), torch.cat([self.pos, pos])
        keep = int(torch.searchsorted(pos, torch.tensor(keep_from, device=pos.device)))
        self.k, self.v, self.pos = k[:, :, keep:], v[:, :, keep:], pos[keep:]


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, pattern: AttentionPattern, *, position: str = "none",
                 global_projections: bool = False, dropout: float = 0.0, bias: bool = True,
                 rope_base: float = 10000.0, xpos_scale_base: float = 512.0, backend: str = "auto"):
        super().__init__()
        if hidden_size % num_heads:
            raise LongctxError(f"hidden size {hidden_size} is not divisible by the {num_heads} heads")
        if position not in POSITION_KINDS:
            raise LongctxError(f"position encoding {position!r} is unknown; use one of {', '.join(POSITION_KINDS)}")
        pattern.head_dilations(num_heads)  # a per-head dilation list must match the heads
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.pattern, self.position, self.backend = pattern, position, backend
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.global_projections = global_projections
        if global_projections:
            self.query_global = nn.Linear(hidden_size, hidden_size, bias=bias)
            self.key_global = nn.Linear(hidden_size, hidden_size, bias=bias)
            self.value_global = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.out = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.rotary = None
        if position in ("rope", "xpos"):
            self.rotary = Rotary(self.head_dim, rope_base, xpos=position == "xpos", scale_base=xpos_scale_base)
        if position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(num_heads), persistent=False)
        else:
            self.alibi_slopes = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape
        return x.view(B, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, key_padding_mask=None, global_mask=None, positions=None,
                cache: LayerCache | None = None):
        """hidden (B, n, hidden) -> (B, n, hidden). Masks are (B, n) bool: True = real / global token.

        With ``cache`` (causal patterns, for generation), the new tokens at ``positions`` attend to the
        cached keys too, and the cache keeps only the keys the pattern can still reach.
        """
        B, n, _ = hidden.shape
        if positions is None:
            positions = torch.arange(n, device=hidden.device)
        if cache is not None:
            return self._forward_cached(hidden, positions, cache)
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions)
        global_qkv = None
        if self.global_projections and global_mask is not None:
            qg, kg = self._heads(self.query_global(hidden)), self._heads(self.key_global(hidden))
            vg = self._heads(self.value_global(hidden))
            if self.rotary is not None:
                qg, kg = self.rotary(qg, kg, positions)
            global_qkv = (qg, kg, vg)
        slopes = None if self.alibi_slopes is None else self.alibi_slopes.to(q.dtype)
        ctx = attention(q, k, v, self.pattern, key_padding_mask=key_padding_mask, global_mask=global_mask,
                        global_qkv=global_qkv, alibi_slopes=slopes, backend=self.backend)
        return self.dropout(self.out(ctx.transpose(1, 2).reshape(B, n, -1)))

    def _forward_cached(self, hidden, positions, cache: LayerCache):
        B, n, _ = hidden.shape
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions)
        slopes = None if self.alibi_slopes is None else self.alibi_slopes.to(q.dtype)
        if len(cache) == 0:  # prefill: the fast kernel over the prompt
            ctx = attention(q, k, v, self.pattern, alibi_slopes=slopes, backend=self.backend)
        else:
            ctx = attention_at(q, torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2), positions,
                               torch.cat([cache.pos, positions]), self.pattern, alibi_slopes=slopes)
        keep_from = self.pattern.min_visible_key(int(positions[-1]) + 1, self.num_heads)
        cache.extend(k, v, positions, keep_from)
        return self.dropout(self.out(ctx.transpose(1, 2).reshape(B, n, -1)))
