"""Attention patterns, each defined once as a mask predicate.

A pattern says which key positions a query position may attend to: ``local_allowed(q_pos, k_pos, d)``
is that predicate, evaluated elementwise on broadcastable integer tensors of *absolute* positions
(``d`` is the head's dilation). It is the specification: the dense reference builds the full mask from
it, the blocked CPU kernel evaluates it on each block of the band, and FlexAttention's ``mask_mod`` calls
it directly.

On top of the local pattern come per-token flags (see ``full_mask``):
- key padding: a key that is padding is never attended;
- global tokens (Longformer): a global query attends to every key, and every query attends to every
  global key (still subject to padding and, for a causal pattern, to causality).

Window convention: ``window`` is one-sided. A query at ``i`` sees keys ``i - w .. i + w`` (2w + 1 keys),
so Hugging Face's two-sided ``attention_window`` is ``2 * window``. With dilation ``d`` it sees
``i + d*j`` for ``|j| <= w`` (Longformer's dilated sliding window).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longctx.errors import LongctxError

KINDS = ("full", "sliding", "blocks", "blockwise_causal")


@dataclass(frozen=True)
class AttentionPattern:
    """Which keys each query may see.

    kind:      "full" | "sliding" (Longformer) | "blocks" (disjoint local blocks, Xiong et al.)
               | "blockwise_causal" (LeX: causal in the own block plus the whole previous block)
    window:    one-sided sliding window w (Longformer's attention_window = 2 * w)
    dilation:  one int for all heads, or one int per head (Longformer's dilated sliding window)
    block:     block size b for "blocks" and "blockwise_causal"
    causal:    keys after the query are never seen (always true for "blockwise_causal")
    """

    kind: str = "full"
    window: int = 0
    dilation: int | tuple[int, ...] = 1
    block: int = 0
    causal: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LongctxError(f"attention pattern kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        for name in ("window", "block"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool):
                raise LongctxError(f"attention {name} must be an integer, got {val!r}")
        if isinstance(self.dilation, list):
            object.__setattr__(self, "dilation", tuple(self.dilation))
        dils = self.dilation if isinstance(self.dilation, tuple) else (self.dilation,)
        if any((not isinstance(d, int)) or d < 1 for d in dils):
            raise LongctxError(f"attention dilation must be integers >= 1, got {self.dilation!r}")
        if self.kind == "sliding" and self.window < 0:
            raise LongctxError(f"sliding window must be >= 0, got {self.window}")
        if self.kind != "sliding" and any(d != 1 for d in dils):
            raise LongctxError(f"dilation applies to the sliding window only, not to {self.kind!r}")
        if self.kind in ("blocks", "blockwise_causal") and self.block < 1:
            raise LongctxError(f"pattern {self.kind!r} needs a block size >= 1, got {self.block}")
        if self.kind == "blockwise_causal" and not self.causal:
            object.__setattr__(self, "causal", True)

    # -- per-head dilation ---------------------------------------------------------------------------
    def head_dilations(self, num_heads: int) -> tuple[int, ...]:
        """The dilation of each head; a per-head list must have one entry per head."""
        if isinstance(self.dilation, tuple):
            if len(self.dilation) == 1:
                return self.dilation * num_heads
            if len(self.dilation) != num_heads:
                raise LongctxError(
                    f"dilation lists {len(self.dilation)} values but the layer has {num_heads} heads; "
                    "give one value per head or a single value")
            return self.dilation
        return (int(self.dilation),) * num_heads

    def head_params(self, num_heads: int, device=None) -> torch.Tensor:
        """The per-head argument of ``local_allowed`` as an (H, 1, 1) tensor (here: the dilations)."""
        return torch.tensor(self.head_dilations(num_heads), device=device).view(num_heads, 1, 1)

    # -- the predicate -------------------------------------------------------------------------------
    def local_allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor, dilation=1) -> torch.Tensor:
        """The pattern's predicate on absolute positions (broadcasting); causality included.

        ``dilation`` may be an int or a tensor broadcastable against the positions (one per head).
        Written with elementwise tensor ops only, so FlexAttention can trace it as a ``mask_mod``.
        """
        rel = q_pos - k_pos  # > 0: key is in the past
        if self.kind == "full":
            ok = rel == rel  # all true, with the broadcast shape
        elif self.kind == "sliding":
            ok = (rel.abs() <= self.window * dilation) & (torch.remainder(rel, dilation) == 0)
        elif self.kind == "blocks":
            ok = torch.div(q_pos, self.block, rounding_mode="floor") == torch.div(k_pos, self.block, rounding_mode="floor")
        else:  # blockwise_causal: own block and the whole previous block
            ok = torch.div(k_pos, self.block, rounding_mode="floor") >= torch.div(q_pos, self.block, rounding_mode="floor") - 1
        if self.causal:
            ok = ok & (rel >= 0)
        return ok

    # -- geometry of the band, for the blocked kernel --------------------------------------------------
    def band(self, n: int, chunk: int | None = None) -> tuple[int, int, int]:
        """(chunk c, chunks to the left nL, chunks to the right nR) covering every allowed local pair.

        For "sliding" this is in units of the dilation-permuted sequence (see ``blocked``), where a
        dilated window is a plain window of ``w`` on each residue class.
        """
        if self.kind == "full":
            c = chunk or min(256, _round_up(max(n, 1), 16))
            nk = math.ceil(n / c)
            return c, nk, 0 if self.causal else nk
        if self.kind == "blocks":
            return self.block, 0, 0
        if self.kind == "blockwise_causal":
            return self.block, 1, 0
        w = self.window
        c = chunk or default_chunk(w)
        nb = math.ceil(w / c)
        return c, nb, 0 if self.causal else nb

    def min_visible_key(self, q_pos: int, num_heads: int = 1) -> int:
        """For a causal pattern: the smallest key position that a query at ``q_pos`` or later may still
        attend. A key-value cache may drop every key before it, so its size stays bounded."""
        if not self.causal:
            raise LongctxError("a key-value cache needs a causal pattern")
        if self.kind == "full":
            return 0
        if self.kind == "sliding":
            return max(0, q_pos - self.window * max(self.head_dilations(num_heads)))
        block = q_pos // self.block
        return max(0, (block if self.kind == "blocks" else block - 1) * self.block)

    def attended_pairs(self, n: int, num_heads: int = 1) -> float:
        """Exact count of allowed (query, key) pairs per head for a length-n unpadded sequence with no
        global tokens, averaged over heads: the useful work, for FLOP accounting."""
        total = 0
        for d in set(self.head_dilations(num_heads)):
            heads = self.head_dilations(num_heads).count(d)
            total += heads * _count_pairs(self, n, d)
        return total / num_heads


def _count_pairs(p: AttentionPattern, n: int, d: int) -> int:
    if p.kind == "full":
        return n * (n + 1) // 2 if p.causal else n * n
    if p.kind == "sliding":
        # keys i + d*j, |j| <= w (j <= 0 when causal), inside [0, n)
        total = 0
        for j in range(-p.window, (0 if p.causal else p.window) + 1):
            total += max(0, n - abs(j) * d)
        return total
    b = p.block
    full_blocks, rest = divmod(n, b)
    sizes = [b] * full_blocks + ([rest] if rest else [])
    if p.kind == "blocks":
        return sum(s * (s + 1) // 2 if p.causal else s * s for s in sizes)
    # blockwise causal: causal triangle inside the block + every key of the previous block
    return sum(s * (s + 1) // 2 + (sizes[i - 1] * s if i else 0) for i, s in enumerate(sizes))


def default_chunk(window: int) -> int:
    """Query-chunk size for a one-sided window w: w/2 keeps (2w+1)/(2.5w) = 80% of the computed scores
    useful; from w = 128 on, w/4 keeps (2w+1)/(2.25w) = 89% while the matrix products (64 rows and more)
    still run near the machine's peak (measured: 3% faster at w = 256, 2% at w = 128)."""
    if window <= 32:
        return max(16, _round_up(window, 16))
    if window >= 128:
        return _round_up(window // 4, 16)
    return _round_up(window // 2, 16)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def compose(local, q_pos, k_pos, *, causal: bool, key_valid=None, q_global=None, k_global=None):
    """THE rule that puts per-token flags onto a pattern's predicate; every path uses it (the dense
    reference's mask, each block of the blocked kernel, FlexAttention's ``mask_mod``, the rows of global
    queries, SDPA's mask and the decoding step), so the flags mean the same thing everywhere.

    local:     the pattern's predicate on (q_pos, k_pos) (causality included), or False for none;
    key_valid: the key is a real token (padding is never attended, whatever else holds);
    q_global / k_global: the query / key is a global token (Longformer): then the pair is allowed on
               top of the pattern, still subject to causality and to padding.
    All arguments broadcast against each other; only elementwise ops, so FlexAttention can trace it.
    """
    glob = q_global
    if k_global is not None:
        glob = k_global if glob is None else glob | k_global
    ok = local
    if glob is not None:
        if causal:
            glob = glob & (k_pos <= q_pos)
        ok = glob | ok
    if key_valid is not None:
        ok = key_valid & ok
    return ok


def full_mask(pattern: AttentionPattern, n: int, num_heads: int = 1, key_padding_mask=None,
              global_mask=None, device=None) -> torch.Tensor:
    """The complete boolean mask (B or 1, H, n, n): True where query i may attend key j.

    key_padding_mask: (B, n) bool, True for real tokens. global_mask: (B, n) bool, True for global tokens.
    """
    pos = torch.arange(n, device=device)
    heads = pattern.head_params(num_heads, device)  # (H, 1, 1)
    qp, kp = pos.view(1, n, 1), pos.view(1, 1, n)
    m = pattern.local_allowed(qp, kp, heads).unsqueeze(0)  # (1, H, n, n)
    g = None if global_mask is None else global_mask.bool()
    return compose(m, qp, kp, causal=pattern.causal,
                   key_valid=None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :],
                   q_global=None if g is None else g[:, None, :, None],
                   k_global=None if g is None else g[:, None, None, :])
