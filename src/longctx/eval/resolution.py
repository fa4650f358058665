"""Attention resolution (Sun et al., "A Length-Extrapolatable Transformer").

For expected attention scores s[i] at distance i (i = 0 .. N), the resolution is

    R(s) = sum_i e^{s[i]} (e^{s[i]} - e^{s[i+1]}) / (sum_i e^{s[i]})^2,

with the difference taken for i < N. It is high when scores fall off with distance (the model can
tell positions apart) and 0 when they are flat; a length-extrapolating model keeps it high as N grows.
"""
from __future__ import annotations

import torch

from longctx.attention.layer import SelfAttention


def attention_resolution(s: torch.Tensor) -> float:
    """R(s) for a 1-D tensor of expected scores by distance (s[0]: distance 0)."""
    s = s.double()
    e = torch.exp(s - s.max())  # R is invariant to a common shift of the scores
    return float((e[:-1] * (e[:-1] - e[1:])).sum() / e.sum() ** 2)


def expected_scores_by_distance(layer: SelfAttention, hidden: torch.Tensor) -> torch.Tensor:
    """Mean pre-softmax score (q.k / sqrt(d), plus ALiBi's bias) of a causal layer for each distance
    i = n - m >= 0, averaged over batch, heads and query positions: (n,)."""
    n = hidden.shape[1]
    # raw scores (no mask: the expectation is over every earlier position, whatever the pattern sees)
    mean = layer.scores(hidden, masked=False, dtype=torch.float64).mean((0, 1))  # (n, n)
    return torch.stack([torch.diagonal(mean, -i).mean() for i in range(n)])


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
