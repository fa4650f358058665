"""Blocked band attention for CPU training and inference: memory O(n * w), time falling with the window.

Queries are cut into chunks of ``c`` positions. Chunk ``i`` is scored against the keys of chunks
``i - nL .. i + nR`` (its *band*, ``span = (nL + 1 + nR) * c`` keys) plus the ``G`` global keys, as one
dense matrix product; the pattern's predicate, evaluated on the absolute positions of that block, masks
the pairs it does not allow. Nothing of size n x n is ever made.

The autograd function is written flash-style: forward keeps only q, k, v, the output and the row
log-sum-exp; backward recomputes each block's probabilities. Chunks are processed in groups whose
score block stays under a fixed number of elements, so peak memory is a constant plus O(n * d).

Dilated sliding windows run here as plain windows: ``sliding_band_attention`` permutes the sequence so
each residue class mod d is contiguous (there the dilated window is an ordinary window of w), and the
predicate is still evaluated on the original positions, so the result is exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longctx.attention.patterns import AttentionPattern

# Upper bound on the elements of one group's score block (fp32: 64 MB).
GROUP_ELEMENTS = 1 << 24


class BandGeometry:
    """Everything about positions and masks that forward and backward share (no tensors of size n^2)."""

    def __init__(self, pattern: AttentionPattern, dilation: int, pos: torch.Tensor, key_valid, g_pos,
                 g_valid, alibi_slopes, B: int, H: int, chunk: int | None):
        n = pos.numel()
        self.pattern, self.dilation = pattern, dilation
        self.c, self.nL, self.nR = pattern.band(n, chunk)
        c = self.c
        self.n = n
        self.nc = max(1, math.ceil(n / c))
        self.nk = self.nc + self.nL + self.nR  # key chunks after padding
        self.span = (self.nL + 1 + self.nR) * c
        self.G = 0 if g_pos is None else g_pos.shape[-1]
        dev = pos.device
        # positions of the padded key sequence; padded slots are never valid keys
        left, right = self.nL * c, self.nk * c - self.nL * c - n
        kpos = F.pad(pos, (left, right))
        kvalid = torch.ones(1, n, dtype=torch.bool, device=dev) if key_valid is None else key_valid.bool()
        kvalid = F.pad(kvalid, (left, right), value=False)
        self.q_pos = F.pad(pos, (0, self.nc * c - n)).view(self.nc, c)
        self.k_pos = _windows(kpos.view(self.nk, c), self.nc, self.nL + 1 + self.nR)  # (nc, span)
        self.k_valid = _windows(kvalid.view(kvalid.shape[0], self.nk, c), self.nc, self.nL + 1 + self.nR)
        self.g_pos, self.g_valid = g_pos, g_valid  # (B, G)
        self.slopes = None if alibi_slopes is None else alibi_slopes.view(1, H, 1, 1, 1)
        per_chunk = B * H * c * (self.span + self.G)
        self.group = max(1, GROUP_ELEMENTS // max(1, per_chunk))

    def groups(self):
        for g0 in range(0, self.nc, self.group):
            yield g0, min(self.nc, g0 + self.group)

    def add_bias_and_mask(self, S: torch.Tensor, g0: int, g1: int) -> None:
        """In place: S (B, H, m, c, span + G) += ALiBi bias, then -inf where the pattern forbids."""
        qp = self.q_pos[g0:g1, :, None]  # (m, c, 1)
        kp = self.k_pos[g0:g1, None, :]  # (m, 1, span)
        allowed = self.pattern.local_allowed(qp, kp, self.dilation) & self.k_valid[:, g0:g1, None, :]
        if self.G:
            gp = self.g_pos[:, None, None, :]  # (B, 1, 1, G)
            g_ok = self.g_valid[:, None, None, :]
            if self.pattern.causal:
                g_ok = g_ok & (gp <= qp)
            g_ok = g_ok.expand(-1, g1 - g0, self.c, -1)
            allowed = torch.cat([allowed.expand(g_ok.shape[0], -1, -1, -1), g_ok], dim=-1)
        if self.slopes is not None:
            dist = (qp - kp).abs().unsqueeze(0)
            if self.G:
                dist = torch.cat([dist.expand(self.g_pos.shape[0], -1, -1, -1),
                                  (qp - self.g_pos[:, None, None, :]).abs()], dim=-1)
            S.sub_(dist.unsqueeze(1).to(S.dtype) * self.slopes.to(S.dtype))
        S.masked_fill_(~allowed.unsqueeze(1), float("-inf"))


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Scores and softmax run in fp32 at least (bf16/fp16 inputs are upcast; fp64 stays fp64)."""
    return x.float() if x.element_size() < 4 else x


def _windows(x: torch.Tensor, nc: int, width: int) -> torch.Tensor:
    """Chunks i .. i + width - 1 of x (..., nk, c) side by side for each i < nc: (..., nc, width * c)."""
    return torch.cat([x[..., j:j + nc, :] for j in range(width)], dim=-1)


def _band_keys(xc: torch.Tensor, g0: int, g1: int, width: int, xg) -> torch.Tensor:
    """Keys (or values) for query chunks g0..g1: (B, H, m, span + G, d)."""
    parts = [xc[:, :, g0 + j:g1 + j] for j in range(width)]
    if xg is not None:
        parts.append(xg[:, :, None].expand(-1, -1, g1 - g0, -1, -1))
    return torch.cat(parts, dim=3)


class _BandAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kg, vg, geo: BandGeometry):
        B, H, n, d = q.shape
        c, nc, nk, width = geo.c, geo.nc, geo.nk, geo.nL + 1 + geo.nR
        qc = F.pad(q, (0, 0, 0, nc * c - n)).view(B, H, nc, c, d)
        pad = (0, 0, geo.nL * c, nk * c - geo.nL * c - n)
        kc = F.pad(k, pad).view(B, H, nk, c, d)
        vc = F.pad(v, pad).view(B, H, nk, c, d)
        out = q.new_empty(B, H, nc, c, d)
        lse = q.new_empty(B, H, nc, c, 1, dtype=_f32(q[:0]).dtype)
        for g0, g1 in geo.groups():
            S = _f32(qc[:, :, g0:g1] @ _band_keys(kc, g0, g1, width, kg).transpose(-1, -2))
            geo.add_bias_and_mask(S, g0, g1)
            mx = S.amax(-1, keepdim=True)
            mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            P = S.sub_(mx).exp_()
            denom = P.sum(-1, keepdim=True)
            out[:, :, g0:g1] = (P.to(v.dtype) @ _band_keys(vc, g0, g1, width, vg)) / denom.clamp_min(1e-30).to(v.dtype)
            lse[:, :, g0:g1] = mx + denom.log()
        out = out.view(B, H, nc * c, d)[:, :, :n]
        ctx.save_for_backward(q, k, v, kg, vg, out, lse)
        ctx.geo = geo
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kg, vg, out, lse = ctx.saved_tensors
        geo: BandGeometry = ctx.geo
        B, H, n, d = q.shape
        c, nc, nk, width, span = geo.c, geo.nc, geo.nk, geo.nL + 1 + geo.nR, geo.span
        qc = F.pad(q, (0, 0, 0, nc * c - n)).view(B, H, nc, c, d)
        pad = (0, 0, geo.nL * c, nk * c - geo.nL * c - n)
        kc = F.pad(k, pad).view(B, H, nk, c, d)
        vc = F.pad(v, pad).view(B, H, nk, c, d)
        doc = F.pad(dout, (0, 0, 0, nc * c - n)).view(B, H, nc, c, d)
        Dc = F.pad(_f32(dout * out).sum(-1), (0, nc * c - n)).view(B, H, nc, c, 1)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        dqc = torch.empty_like(qc)
        dkc = torch.zeros_like(kc)
        dvc = torch.zeros_like(vc)
        dkg = None if kg is None else torch.zeros_like(kg)
        dvg = None if vg is None else torch.zeros_like(vg)
        for g0, g1 in geo.groups():
            Kw = _band_keys(kc, g0, g1, width, kg)
            Vw = _band_keys(vc, g0, g1, width, vg)
            Qg, dOg = qc[:, :, g0:g1], doc[:, :, g0:g1]
            S = _f32(Qg @ Kw.transpose(-1, -2))
            geo.add_bias_and_mask(S, g0, g1)
            P = S.sub_(lse[:, :, g0:g1]).exp_()
            dVw = P.to(dOg.dtype).transpose(-1, -2) @ dOg
            dS = _f32(dOg @ Vw.transpose(-1, -2)).sub_(Dc[:, :, g0:g1]).mul_(P).to(q.dtype)
            dqc[:, :, g0:g1] = dS @ Kw
            dKw = dS.transpose(-1, -2) @ Qg
            for j in range(width):
                dkc[:, :, g0 + j:g1 + j] += dKw[:, :, :, j * c:(j + 1) * c]
                dvc[:, :, g0 + j:g1 + j] += dVw[:, :, :, j * c:(j + 1) * c]
            if kg is not None:
                dkg += dKw[:, :, :, span:].sum(2)
                dvg += dVw[:, :, :, span:].sum(2)
        lo = geo.nL * c
        dq = dqc.view(B, H, nc * c, d)[:, :, :n]
        dk = dkc.view(B, H, nk * c, d)[:, :, lo:lo + n]
        dv = dvc.view(B, H, nk * c, d)[:, :, lo:lo + n]
        return dq, dk, dv, dkg, dvg, None


def band_attention(q, k, v, pattern: AttentionPattern, pos, *, dilation: int = 1, key_valid=None,
                   kg=None, vg=None, g_pos=None, g_valid=None, alibi_slopes=None, chunk=None):
    """Attention of q (already scaled) over the pattern's band plus optional global keys.

    q, k, v: (B, H, n, d) in the order given by ``pos`` (n,) absolute positions.
    key_valid (B, n): real, non-global keys of the band (global keys come only through kg/vg).
    kg, vg (B, H, G, d), g_pos (B, G), g_valid (B, G): the global keys every query may also attend.
    """
    B, H = q.shape[:2]
    geo = BandGeometry(pattern, dilation, pos, key_valid, g_pos, g_valid, alibi_slopes, B, H, chunk)
    return _BandAttention.apply(q, k, v, kg, vg, geo)


def dilation_permutation(n: int, d: int, device=None) -> torch.Tensor:
    """Order positions by residue mod d (stable): each residue class becomes contiguous."""
    pos = torch.arange(n, device=device)
    return torch.argsort(torch.remainder(pos, d) * n + pos)
