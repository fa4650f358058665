"""Attention resolution (Sun et al., "A Length-Extrapolatable Transformer").

For expected attention scores s[i] at distance i (i = 0 .. N), the resolution is

    R(s) = sum_i e^{s[i]} (e^{s[i]} - e^{s[i+1]}) / (sum_i e^{s[i]})^2,

with the difference taken for i < N. It is high when scores fall off with distance (the model can
tell positions apart) and 0 when they are flat; a length-extrapolating model keeps it high as N grows.

s[i] is measured on the attention the layer actually uses: the mean pre-softmax score (q.k / sqrt(d)
plus any score bias, e.g. ALiBi's) over the (batch, head, query) pairs at distance i that the layer's
mask *allows*. A pair the mask forbids (a future key, or a key outside LeX's blockwise causal window)
never enters the expectation; a distance no query may attend gets s[i] = -inf, i.e. e^{s[i]} = 0, as
a softmax gives it. So blockwise causal attention (blocks of half the training length, keys up to
distance 2 * block - 1) changes R, as in the paper, where unmasked scores could not.
"""
from __future__ import annotations

import torch

from longctx.attention.layer import SelfAttention


def attention_resolution(s: torch.Tensor) -> float:
    """R(s) for a 1-D tensor of expected scores by distance (s[0]: distance 0)."""
    s = s.double()
    e = torch.exp(s - s.max())  # R is invariant to a common shift of the scores
    return float((e[:-1] * (e[:-1] - e[1:])).sum() / e.sum() ** 2)


def expected_scores_by_distance(layer: SelfAttention, hidden: torch.Tensor, masked: bool = True) -> torch.Tensor:
    """s[i] for i = 0 .. n-1 (float64, (n,)): the mean pre-softmax score of a causal layer over the pairs
    at distance i = q - k >= 0 that its mask allows (every earlier pair with ``masked=False``); -inf for
    a distance no pair may attend. ``hidden``: the layer's input (B, n, hidden)."""
    n = hidden.shape[1]
    pos = torch.arange(n, device=hidden.device)
    dist = pos[:, None] - pos[None, :]  # (n, n): query minus key
    sums = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    counts = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    for b in range(hidden.shape[0]):  # one sequence at a time: (H, n, n) doubles, not (B, H, n, n)
        s = layer.scores(hidden[b:b + 1], masked=masked, dtype=torch.float64)[0]  # (H, n, n), -inf = masked
        ok = torch.isfinite(s) & (dist >= 0)
        d = dist.expand_as(s)[ok]
        sums.index_add_(0, d, s[ok])
        counts.index_add_(0, d, torch.ones_like(d, dtype=torch.float64))
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("-inf")))


def model_resolution(model, input_ids: torch.Tensor) -> list[float]:
    """Attention resolution of every layer of a longctx model on ``input_ids`` (B, n)."""
    captured = []
    hooks = [blk.attention.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0])))
             for blk in model.longctx.layers]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return [attention_resolution(expected_scores_by_distance(mod, x)) for mod, x in captured]
