"""The attention layer used by every longctx model: projections, pattern, positions, kernel.

With ``global_projections`` the layer has Longformer's second set of projections (query_global,
key_global, value_global): global queries are computed with them against global keys/values of every
token, exactly as Hugging Face's ``LongformerSelfAttention`` does, while all other queries use the local
projections (and see the global tokens through the local keys).
"""
from __future__ import annotations

import torch
from torch import nn

from longctx.attention.functional import attention
from longctx.attention.patterns import AttentionPattern
from longctx.errors import LongctxError
from longctx.positions import POSITION_KINDS, Rotary, alibi_slopes


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

    def forward(self, hidden: torch.Tensor, key_padding_mask=None, global_mask=None, positions=None):
        """hidden (B, n, hidden) -> (B, n, hidden). Masks are (B, n) bool: True = real / global token."""
        B, n, _ = hidden.shape
        if positions is None:
            positions = torch.arange(n, device=hidden.device)
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
