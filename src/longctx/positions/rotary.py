"""Rotary position embedding (RoPE, Su et al.) and xPos (Sun et al., "A Length-Extrapolatable
Transformer").

Pairs are interleaved: rotation pair i of a head of dimension d is (x[2i], x[2i+1]), i < d/2, turned by
the angle p * theta_i with theta_i = base^(-2i/d). xPos also scales pair i of the query at position n by
zeta_i^(n/B) and of the key at position m by zeta_i^(-m/B), zeta_i = (2i/d + gamma)/(1 + gamma),
gamma = 0.4, B = scale_base; the score then carries zeta_i^((n-m)/B), which decays with distance.

xPos's per-position factors grow as zeta^(-m/B): in fp32 they stay finite for |m| up to about
B * 38 / log10(1/zeta_0) (about 35,000 positions for d = 64, B = 512); ``center`` shifts the positions
before scaling (scores depend on n - m only), which doubles that reach for a sequence centred on it.
"""
from __future__ import annotations

import torch
from torch import nn

from longctx.errors import LongctxError


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0, xpos: bool = False, scale_base: float = 512.0,
                 gamma: float = 0.4):
        super().__init__()
        if head_dim % 2:
            raise LongctxError(f"rotary positions need an even head size, got {head_dim}")
        self.head_dim, self.xpos, self.scale_base = head_dim, xpos, float(scale_base)
        self.base, self.gamma = float(base), float(gamma)

    def frequencies(self, dtype=torch.float64, device=None):
        """(theta_i, zeta_i) for i < d/2, computed in ``dtype`` (no fp32 rounding in fp64 use)."""
        i = torch.arange(self.head_dim // 2, dtype=dtype, device=device)
        theta = self.base ** (-2 * i / self.head_dim)
        zeta = (2 * i / self.head_dim + self.gamma) / (1 + self.gamma)
        return theta, zeta

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, key: bool = False, center: float = 0.0):
        """x (..., n, d) at integer ``positions`` (n,) or (B, 1, n) -> rotated (and, for xPos, scaled) x."""
        dt = x.dtype if x.element_size() >= 4 else torch.float32  # never rotate in half precision
        p = positions.to(dt)[..., None]  # (n, 1), or (B, 1, n, 1) for one row of positions per sequence
        theta, zeta = self.frequencies(dt, x.device)
        angle = p * theta  # (n, d/2)
        cos, sin = angle.cos(), angle.sin()
        if self.xpos:
            power = (p - center) / self.scale_base
            scale = zeta ** (-power if key else power)
            cos, sin = cos * scale, sin * scale
        x2 = x.to(dt).unflatten(-1, (-1, 2))
        x0, x1 = x2[..., 0], x2[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
        return out.to(x.dtype)

    def forward(self, q, k, positions, center: float = 0.0):
        return self.rotate(q, positions, False, center), self.rotate(k, positions, True, center)
