"""The attention layer used by every longctx model: projections, positions, and a mechanism.

``SelfAttention`` projects the hidden states to q, k, v, lets its position encoding rotate them (RoPE,
xPos) or supply a score bias (ALiBi), and hands them to its *mechanism*, built from the registry
(``attention/mechanism.py``): a mask pattern (full, sliding, blocks, blockwise_causal, bigbird) or an
approximate family (linformer, performer, nystrom, lsh). The layer does not know which.

With ``global_projections`` (and a mechanism that takes them) the layer has Longformer's second set of
projections (query_global, key_global, value_global): global queries are computed with them against
global keys/values of every token, exactly as Hugging Face's ``LongformerSelfAttention`` does, while all
other queries use the local projections (and see the global tokens through the local keys).
"""
from __future__ import annotations

import torch
from torch import nn

from longctx.attention import dispatch
from longctx.attention.masked import pattern_fields
from longctx.attention.mechanism import MECHANISMS, LayerCache, LayerContext, Mechanism, build
from longctx.attention.patterns import AttentionPattern, full_mask
from longctx.attention.reference import masked_softmax
from longctx.dropout import Dropout
from longctx.errors import LongctxError
from longctx.positions import POSITION_KINDS, in_attention

__all__ = ["LayerCache", "SelfAttention", "attention_entry"]


def attention_entry(attention) -> tuple[str, dict, bool]:
    """What a layer's ``attention`` argument names: (type, fields, causal-by-itself). It may be a
    registry name ("sliding"), a dict ``{type: NAME, **fields}`` or an ``AttentionPattern``."""
    if isinstance(attention, AttentionPattern):
        name, fields = pattern_fields(attention)
        return name, fields, attention.causal
    if isinstance(attention, str):
        return attention, {}, False
    if isinstance(attention, dict):
        fields = dict(attention)
        name = fields.pop("type", None)
        if name is None:
            raise LongctxError(f"attention {attention!r} needs a 'type' (one of {', '.join(sorted(MECHANISMS))})")
        return str(name), fields, bool(fields.pop("causal", False))
    raise LongctxError(f"attention must be a name, a dict with 'type' or a pattern, got {attention!r}")


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, attention="full", *, position: str = "none",
                 global_projections: bool = False, dropout: float = 0.0, bias: bool = True,
                 rope_base: float = 10000.0, xpos_scale_base: float = 512.0, backend: str = "auto",
                 causal: bool = False, max_len: int = 4096, layer_idx: int = 0, seed: int = 0):
        super().__init__()
        if hidden_size % num_heads:
            raise LongctxError(f"hidden size {hidden_size} is not divisible by the {num_heads} heads")
        if position not in POSITION_KINDS:
            raise LongctxError(f"position encoding {position!r} is unknown; use one of {', '.join(POSITION_KINDS)}")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.position, self.backend, self.causal = position, backend, causal
        self._ctx = dict(num_heads=num_heads, head_dim=self.head_dim, max_len=max_len, layer_idx=layer_idx,
                         seed=seed, backend=backend)
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.mechanism: Mechanism = self._build(attention)
        self.global_projections = global_projections and self.mechanism.supports.global_projections
        if self.global_projections:
            self.query_global = nn.Linear(hidden_size, hidden_size, bias=bias)
            self.key_global = nn.Linear(hidden_size, hidden_size, bias=bias)
            self.value_global = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.out = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.dropout = Dropout(dropout)
        self.positions = in_attention(position, num_heads, self.head_dim, rope_base=rope_base,
                                      xpos_scale_base=xpos_scale_base)

    # -- the mechanism ----------------------------------------------------------------------------------
    def _build(self, attention) -> Mechanism:
        if isinstance(attention, Mechanism):
            return attention
        name, fields, causal = attention_entry(attention)
        ctx = LayerContext(causal=self.causal or causal, **self._ctx)
        return build(name, fields, ctx)

    def set_attention(self, attention) -> None:
        """Replace the mechanism (staged training's new windows, blockwise evaluation). A mechanism with
        parameters starts fresh; the mask family has none."""
        self.mechanism = self._build(attention)

    @property
    def pattern(self) -> AttentionPattern | None:
        """The mask pattern, for mask mechanisms (None for the approximate families)."""
        return getattr(self.mechanism, "pattern", None)

    # -- forward --------------------------------------------------------------------------------------
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape
        return x.view(B, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, n, d)

    def project(self, hidden: torch.Tensor, positions: torch.Tensor, glob: bool = False):
        """q, k, v (B, H, n, d) with positions applied (the global projections with ``glob``)."""
        names = ("query_global", "key_global", "value_global") if glob else ("query", "key", "value")
        q, k, v = (self._heads(getattr(self, a)(hidden)) for a in names)
        q, k = self.positions.rotate(q, k, positions)
        return q, k, v

    def forward(self, hidden: torch.Tensor, key_padding_mask=None, global_mask=None, positions=None,
                cache: LayerCache | None = None, output_attentions: bool = False):
        """hidden (B, n, hidden) -> (B, n, hidden). Masks are (B, n) bool: True = real / global token.
        ``positions``: (n,) or (B, n) integer positions (for the position encoding).

        With ``cache`` (causal mechanisms with a cache rule, for generation), the new tokens at
        ``positions`` attend to the cached keys too, and the cache keeps what they can still reach.
        With ``output_attentions``, returns (output, attention probabilities (B, H, n, n)) where the
        probabilities come from ``attention_probs``: an extra pass only when asked, so training pays nothing.
        """
        out = self._forward(hidden, key_padding_mask, global_mask, positions, cache)
        if not output_attentions:
            return out
        return out, self.attention_probs(hidden, key_padding_mask, global_mask, positions)

    def _forward(self, hidden, key_padding_mask, global_mask, positions, cache):
        B, n, _ = hidden.shape
        if positions is None:
            positions = torch.arange(n, device=hidden.device)
        mech = self.mechanism
        if global_mask is not None and not mech.supports.global_tokens:
            raise LongctxError(f"attention {mech.name!r} has no global tokens; drop the global attention mask")
        if cache is not None and not mech.supports.cache:
            raise LongctxError(f"attention {mech.name!r} has no key-value cache; generate with use_cache=False")
        q, k, v = self.project(hidden, positions)
        if mech.kernel_route == "approx":  # one kernel: the dispatcher records (and explains) the call
            dispatch.choose(dispatch.approx_call(mech, q, causal=mech.ctx.causal, key_padding=key_padding_mask,
                                                 global_mask=global_mask, bias=self.positions.bias))
        extra = {}
        if self.global_projections and global_mask is not None and cache is None:
            extra["global_qkv"] = self.project(hidden, positions, glob=True)
        ctx = mech(q, k, v, key_padding=key_padding_mask, global_mask=global_mask, positions=positions,
                   bias=self.positions.bias, cache=cache, **extra)
        return self.dropout(self.out(ctx.transpose(1, 2).flatten(2)))

    # -- analysis -------------------------------------------------------------------------------------
    def attention_probs(self, hidden: torch.Tensor, key_padding_mask=None, global_mask=None, positions=None):
        """The attention matrix (B, H, n, n) this layer applies to ``hidden``: row i is how query i spreads
        its mass over the keys, each row summing to one (zero for a row with no allowed key). It is the
        mechanism's ``attention_map`` (exact probabilities for the mask family, the effective matrix of the
        approximate families); with Longformer's global projections the rows of global tokens are
        softmax(q_g k_g^T) over every real key, as ``forward`` computes them (their values are v_g)."""
        B, n, _ = hidden.shape
        if positions is None:
            positions = torch.arange(n, device=hidden.device)
        q, k, v = self.project(hidden, positions)
        A = self.mechanism.attention_map(q, k, v, key_padding=key_padding_mask, global_mask=global_mask,
                                         positions=positions, bias=self.positions.bias)
        if self.global_projections and global_mask is not None:
            qg, kg, _ = self.project(hidden, positions, glob=True)
            # a global query sees every real key (causally in a decoder, or where the pattern is causal by
            # definition, as blockwise_causal): the full pattern's rows
            pattern = self.pattern
            causal = self.mechanism.ctx.causal or (isinstance(pattern, AttentionPattern) and pattern.causal)
            rows = AttentionPattern("full", causal=causal)
            s = (qg * self.head_dim ** -0.5) @ kg.transpose(-1, -2)
            bias = self.positions.bias
            if bias is not None:
                pos = torch.arange(n, device=hidden.device)
                s = s + bias(pos, pos).to(s.dtype)
            Ag = masked_softmax(s, full_mask(rows, n, self.num_heads, key_padding_mask, None, device=hidden.device))
            A = torch.where(global_mask.bool()[:, None, :, None], Ag.to(A.dtype), A)
        return A

    @torch.no_grad()
    def scores(self, hidden: torch.Tensor, positions=None, *, masked: bool = True, dtype=None) -> torch.Tensor:
        """Pre-softmax scores (B, H, n, n): q . k / sqrt(d) plus the position encoding's bias, and, with
        ``masked``, -inf where the mechanism's mask forbids the pair (mask mechanisms only). ``dtype``:
        the precision of the product (e.g. float64 for analysis)."""
        B, n, _ = hidden.shape
        if positions is None:
            positions = torch.arange(n, device=hidden.device)
        q, k, _ = self.project(hidden, positions)
        dt = dtype or q.dtype
        s = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * self.head_dim ** -0.5
        bias = self.positions.bias
        if bias is not None:
            pos = torch.arange(n, device=hidden.device)
            s = s + bias(pos, pos).to(dt)
        if masked:
            m = self.mechanism.mask(n, device=hidden.device)
            if m is not None:
                s = s.masked_fill(~m, float("-inf"))
        return s
