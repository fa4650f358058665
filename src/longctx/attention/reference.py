"""The dense reference: build the whole mask from the pattern's predicate, run plain softmax attention.

Slow (n x n memory) and obviously right; every fast kernel is tested against it.
"""
from __future__ import annotations

import torch

from longctx.attention.patterns import AttentionPattern, compose, full_mask


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed entries in fp32; a row with no allowed entry gives zeros (and zero gradients,
    never NaN)."""
    s = scores.float() if scores.element_size() < 4 else scores
    s = s.masked_fill(~mask, float("-inf"))
    row_any = mask.any(-1, keepdim=True)
    s = s.masked_fill(~row_any, 0.0)
    return torch.softmax(s, dim=-1).masked_fill(~mask, 0.0).to(scores.dtype)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """ALiBi's additive bias -m_h * |i - j| (symmetric, so the causal case is the same on allowed pairs)."""
    dist = (q_pos[..., :, None] - k_pos[..., None, :]).abs().to(slopes.dtype)
    return -slopes.view(-1, *([1] * dist.dim())) * dist


def dense_attention(q, k, v, pattern: AttentionPattern, *, key_padding_mask=None, global_mask=None,
                    global_qkv=None, alibi_slopes=None, scale=None, score_bias=None):
    """Reference attention. q, k, v: (B, H, n, d). Returns (B, H, n, d).

    key_padding_mask (B, n): True for real tokens. global_mask (B, n): True for global tokens.
    global_qkv: optional (qg, kg, vg), each (B, H, n, d): Longformer's separate global projections; the
    rows of global queries are then computed as qg . kg over vg, attending to every real key.
    alibi_slopes (H,): adds -m_h * |i - j| to every score. score_bias: any callable
    ``(q_pos, k_pos) -> (H, n, n)`` added to the scores (a position encoding's bias).
    """
    B, H, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    pos = torch.arange(n, device=q.device)
    mask = full_mask(pattern, n, H, key_padding_mask, global_mask, device=q.device)
    bias = 0.0 if alibi_slopes is None else alibi_bias(alibi_slopes, pos, pos).to(q.dtype)
    if score_bias is not None:
        bias = bias + score_bias(pos, pos).to(q.dtype)
    scores = (q * scale) @ k.transpose(-1, -2) + bias
    out = masked_softmax(scores, mask) @ v
    if global_qkv is not None and global_mask is not None:
        qg, kg, vg = global_qkv
        kpm = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]
        row_mask = compose(False, pos.view(n, 1), pos.view(1, n), causal=pattern.causal, key_valid=kpm,
                           q_global=torch.ones(1, 1, n, 1, dtype=torch.bool, device=q.device))
        g_out = masked_softmax((qg * scale) @ kg.transpose(-1, -2) + bias, row_mask) @ vg
        out = torch.where(global_mask.bool()[:, None, :, None], g_out, out)
    return out
