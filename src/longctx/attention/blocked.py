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

# Elements in one group's score block: 2^20 fp32 = 4 MB, so a block stays in cache between the matrix
# product that makes it and the softmax that reads it (measured: larger groups are slower here).
GROUP_ELEMENTS = 1 << 20


class BandGeometry:
    """Positions and masks shared by forward and backward (nothing of size n^2).

    Tensors are laid out chunk-major, (chunks, B, H, c, ...), so a group of chunks is one contiguous
    batch for ``torch.bmm``.
    """

    def __init__(self, pattern: AttentionPattern, dilation: int, pos: torch.Tensor, key_valid, g_pos,
                 g_valid, alibi_slopes, B: int, H: int, chunk: int | None):
        n = pos.numel()
        self.pattern, self.dilation, self.n, self.B, self.H = pattern, dilation, n, B, H
        self.c, self.nL, self.nR = pattern.band(n, chunk)
        c = self.c
        self.nc = max(1, math.ceil(n / c))
        self.nk = self.nc + self.nL + self.nR  # key chunks after padding
        self.width = self.nL + 1 + self.nR
        self.span = self.width * c
        self.G = 0 if g_pos is None else g_pos.shape[-1]
        self.L = self.span + self.G  # keys per query chunk
        # padded key sequence: nL chunks before, the rest after; padded slots are never valid keys
        self.left = self.nL * c
        self.right = self.nk * c - self.left - n
        kpos = F.pad(pos, (self.left, self.right))
        kvalid = torch.ones(1, n, dtype=torch.bool, device=pos.device) if key_valid is None else key_valid.bool()
        kvalid = F.pad(kvalid, (self.left, self.right), value=False)
        q_pos = F.pad(pos, (0, self.nc * c - n)).view(self.nc, 1, c, 1)
        k_pos = _windows(kpos.view(self.nk, c), self.nc, self.width).view(self.nc, 1, 1, self.span)
        k_valid = _windows(kvalid.view(-1, self.nk, c), self.nc, self.width).transpose(0, 1)  # (nc, Bk, span)
        allowed = pattern.local_allowed(q_pos, k_pos, dilation) & k_valid[:, :, None, :]  # (nc, Bk, c, span)
        dist = (q_pos - k_pos).abs() if alibi_slopes is not None else None
        if self.G:
            gp = g_pos.view(1, B, 1, self.G)
            g_ok = g_valid.view(1, B, 1, self.G)
            if pattern.causal:
                g_ok = g_ok & (gp <= q_pos)
            allowed = torch.cat([allowed.expand(self.nc, B, c, self.span), g_ok.expand(self.nc, B, c, self.G)], -1)
            if dist is not None:
                dist = torch.cat([dist.expand(self.nc, B, c, self.span), (q_pos - gp).abs()], -1)
        self.blocked = ~allowed.unsqueeze(2)  # (nc, Bk, 1, c, L): True where the score is masked out
        self.dist = None if dist is None else dist.unsqueeze(2)  # (nc, Bk|1, 1, c, L)
        self.slopes = None if alibi_slopes is None else alibi_slopes.view(1, 1, H, 1, 1)
        self.group = max(1, GROUP_ELEMENTS // max(1, B * H * c * self.L))

    def groups(self):
        for g0 in range(0, self.nc, self.group):
            yield g0, min(self.nc, g0 + self.group)

    def scores(self, S: torch.Tensor, qc, kc, kg, buf_k, g0: int, g1: int) -> torch.Tensor:
        """S (m, B, H, c, L) = q . k over the band (+ global keys), ALiBi added, forbidden pairs -inf."""
        m = g1 - g0
        Kw = _band_keys(kc, kg, g0, g1, self.width, buf_k)
        B, H, c = self.B, self.H, self.c
        torch.bmm(qc[g0:g1].view(m * B * H, c, -1), Kw.view(m * B * H, self.L, -1).transpose(1, 2),
                  out=S.view(m * B * H, c, self.L))
        if self.slopes is not None:
            S.sub_(self.dist[g0:g1].to(S.dtype) * self.slopes.to(S.dtype))
        S.masked_fill_(self.blocked[g0:g1], float("-inf"))
        return Kw


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Scores and softmax run in fp32 at least (bf16/fp16 inputs are upcast; fp64 stays fp64)."""
    return x.float() if x.element_size() < 4 else x


def _windows(x: torch.Tensor, nc: int, width: int) -> torch.Tensor:
    """Chunks i .. i + width - 1 of x (..., nk, c) side by side for each i < nc: (..., nc, width * c)."""
    return torch.cat([x[..., j:j + nc, :] for j in range(width)], dim=-1)


def _band_keys(xc, xg, g0: int, g1: int, width: int, buf) -> torch.Tensor:
    """Keys (or values) seen by query chunks g0..g1, written into buf: (m, B, H, L, d)."""
    parts = [xc[g0 + j:g1 + j] for j in range(width)]
    if xg is not None:
        parts.append(xg.unsqueeze(0).expand(g1 - g0, *xg.shape))
    out = buf[: (g1 - g0)]
    torch.cat(parts, dim=3, out=out)
    return out


def _chunked(x: torch.Tensor, before: int, total: int, c: int) -> torch.Tensor:
    """(B, H, n, d) -> zero-padded, chunk-major (total // c, B, H, c, d), contiguous."""
    B, H, n, d = x.shape
    x = F.pad(x, (0, 0, before, total - before - n))
    return x.view(B, H, total // c, c, d).permute(2, 0, 1, 3, 4).contiguous()


def _unchunk(x: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Inverse of _chunked: (nchunks, B, H, c, d) -> (B, H, n, d) from sequence offset ``start``."""
    nch, B, H, c, d = x.shape
    return x.permute(1, 2, 0, 3, 4).reshape(B, H, nch * c, d)[:, :, start:start + n]


class _BandAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kg, vg, slopes, geo: BandGeometry):
        B, H, n, d = q.shape
        c, nc, nk, L, G = geo.c, geo.nc, geo.nk, geo.L, geo.group
        qc = _chunked(q, 0, nc * c, c)
        kc, vc = _chunked(k, geo.left, nk * c, c), _chunked(v, geo.left, nk * c, c)
        out = q.new_empty(nc, B, H, c, d)
        dead = torch.zeros(nc, B, H, c, 1, dtype=torch.bool, device=q.device)
        S = q.new_empty(G, B, H, c, L, dtype=_f32(q[:0]).dtype)
        buf_k = q.new_empty(G, B, H, L, d)
        for g0, g1 in geo.groups():
            m = g1 - g0
            Sg = S[:m]
            geo.scores(Sg, qc, kc, kg, buf_k, g0, g1)
            torch.softmax(Sg, dim=-1, out=Sg)  # a row with no allowed key becomes NaN: marked dead
            Vw = _band_keys(vc, vg, g0, g1, geo.width, buf_k)
            torch.bmm(Sg.view(m * B * H, c, L).to(v.dtype), Vw.view(m * B * H, L, d), out=out[g0:g1].view(m * B * H, c, d))
            dead[g0:g1] = Sg[..., :1].isnan()
        out.masked_fill_(dead, 0.0)
        ctx.save_for_backward(q, k, v, kg, vg, out, dead)
        ctx.geo = geo
        return _unchunk(out, 0, n)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kg, vg, outc, dead = ctx.saved_tensors
        geo: BandGeometry = ctx.geo
        B, H, n, d = q.shape
        c, nc, nk, L, G, width, span = geo.c, geo.nc, geo.nk, geo.L, geo.group, geo.width, geo.span
        qc = _chunked(q, 0, nc * c, c)
        kc, vc = _chunked(k, geo.left, nk * c, c), _chunked(v, geo.left, nk * c, c)
        doc = _chunked(dout, 0, nc * c, c)
        Dc = _f32(doc * outc).sum(-1, keepdim=True)  # (nc, B, H, c, 1)
        any_dead = bool(dead.any())
        fdt = _f32(q[:0]).dtype
        dslopes = None if geo.slopes is None or not ctx.needs_input_grad[5] else torch.zeros(H, dtype=torch.float64)
        dqc = torch.empty_like(qc)
        dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
        dkg = None if kg is None else torch.zeros_like(kg)
        dvg = None if vg is None else torch.zeros_like(vg)
        S, dP = q.new_empty(G, B, H, c, L, dtype=fdt), q.new_empty(G, B, H, c, L, dtype=fdt)
        buf_k, buf_v = q.new_empty(G, B, H, L, d), q.new_empty(G, B, H, L, d)
        dKw, dVw = q.new_empty(G, B, H, L, d), q.new_empty(G, B, H, L, d)
        for g0, g1 in geo.groups():
            m = g1 - g0
            bh = m * B * H
            P, dPg = S[:m], dP[:m]
            Kw = geo.scores(P, qc, kc, kg, buf_k, g0, g1)
            torch.softmax(P, dim=-1, out=P)  # recomputed exactly as in forward
            if any_dead:
                P.masked_fill_(dead[g0:g1], 0.0)
            Vw = _band_keys(vc, vg, g0, g1, width, buf_v)
            Qg, dOg = qc[g0:g1].view(bh, c, d), doc[g0:g1].view(bh, c, d)
            P3 = P.view(bh, c, L)
            torch.bmm(P3.transpose(1, 2).to(dOg.dtype), dOg, out=dVw[:m].view(bh, L, d))
            torch.bmm(dOg, Vw.view(bh, L, d).transpose(1, 2), out=dPg.view(bh, c, L))
            dS = dPg.sub_(Dc[g0:g1]).mul_(P)
            if dslopes is not None:  # d score / d slope_h = -|i - j|
                dslopes -= (dS * geo.dist[g0:g1].to(fdt)).sum((0, 1, 3, 4), dtype=torch.float64)
            dS = dS.to(q.dtype).view(bh, c, L)
            torch.bmm(dS, Kw.view(bh, L, d), out=dqc[g0:g1].view(bh, c, d))
            torch.bmm(dS.transpose(1, 2), Qg, out=dKw[:m].view(bh, L, d))
            for j in range(width):
                dkc[g0 + j:g1 + j] += dKw[:m, :, :, j * c:(j + 1) * c]
                dvc[g0 + j:g1 + j] += dVw[:m, :, :, j * c:(j + 1) * c]
            if kg is not None:
                dkg += dKw[:m, :, :, span:].sum(0)
                dvg += dVw[:m, :, :, span:].sum(0)
        return (_unchunk(dqc, 0, n), _unchunk(dkc, geo.left, n), _unchunk(dvc, geo.left, n), dkg, dvg,
                None if dslopes is None else dslopes.to(geo.slopes.dtype), None)


def band_attention(q, k, v, pattern: AttentionPattern, pos, *, dilation: int = 1, key_valid=None,
                   kg=None, vg=None, g_pos=None, g_valid=None, alibi_slopes=None, chunk=None):
    """Attention of q (already scaled) over the pattern's band plus optional global keys.

    q, k, v: (B, H, n, d) in the order given by ``pos`` (n,) absolute positions.
    key_valid (B, n): real, non-global keys of the band (global keys come only through kg/vg).
    kg, vg (B, H, G, d), g_pos (B, G), g_valid (B, G): the global keys every query may also attend.
    """
    B, H = q.shape[:2]
    geo = BandGeometry(pattern, dilation, pos, key_valid, g_pos, g_valid, alibi_slopes, B, H, chunk)
    return _BandAttention.apply(q, k, v, kg, vg, alibi_slopes, geo)


def dilation_permutation(n: int, d: int, device=None) -> torch.Tensor:
    """Order positions by residue mod d (stable): each residue class becomes contiguous."""
    pos = torch.arange(n, device=device)
    return torch.argsort(torch.remainder(pos, d) * n + pos)
