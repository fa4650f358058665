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

from longctx.attention.patterns import AttentionPattern, compose

# Elements in one group's score block: 2^20 fp32 = 4 MB, so a block stays in cache between the matrix
# product that makes it and the softmax that reads it (measured: larger groups are slower here).
GROUP_ELEMENTS = 1 << 20


class BandGeometry:
    """Positions and masks shared by forward and backward (nothing of size n^2).

    The mask of a group of chunks is built when the group is reached, once for all heads, from the
    pattern's predicate and the key validity. On the unpermuted sequence every pattern here is invariant
    under shifting queries and keys by a whole chunk (for block patterns the chunk is the block), so the
    predicate is evaluated on one chunk's (c, span) positions and reused; this is checked on three chunks,
    and a pattern that is not invariant (or a permuted, dilated sequence) gets the predicate per chunk.
    """

    def __init__(self, pattern: AttentionPattern, dilation: int, pos: torch.Tensor, key_valid, g_pos,
                 g_valid, alibi_slopes, B: int, H: int, chunk: int | None, dtype: torch.dtype):
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
        pos = pos.to(torch.int32)  # int32 arithmetic is about twice as fast as int64 here
        kpos = F.pad(pos, (self.left, self.right))
        kvalid = torch.ones(1, n, dtype=torch.bool, device=pos.device) if key_valid is None else key_valid.bool()
        kvalid = F.pad(kvalid, (self.left, self.right), value=False)
        self.q_pos = F.pad(pos, (0, self.nc * c - n)).view(self.nc, c, 1)
        self.k_pos = kpos.unfold(0, self.span, c).view(self.nc, 1, self.span)
        self.k_valid = kvalid.unfold(1, self.span, c).transpose(0, 1)  # (nc, Bk, span)
        self.base = None
        arange = torch.arange(n, dtype=torch.int32, device=pos.device)
        if torch.equal(pos, arange):
            r = torch.arange(c, dtype=torch.int32, device=pos.device).view(c, 1)
            col = torch.arange(self.span, dtype=torch.int32, device=pos.device).view(1, self.span) - self.left
            shifted = [pattern.local_allowed(r + s, col + s, dilation) for s in {0, c, c * (self.nc - 1)}]
            if all(torch.equal(shifted[0], x) for x in shifted[1:]):
                self.base = shifted[0]  # (c, span), the same for every chunk
        if self.G:
            self.g_pos = g_pos.to(torch.int32).view(B, 1, 1, self.G)
            self.g_valid = g_valid.bool().view(B, 1, 1, self.G)
        self.slopes = None if alibi_slopes is None else alibi_slopes.detach().tolist()
        self.dtype = dtype
        # chunks per group: one head's score block of about GROUP_ELEMENTS
        self.group = max(1, GROUP_ELEMENTS // (c * self.L))

    def groups(self):
        for g0 in range(0, self.nc, self.group):
            yield g0, min(self.nc, g0 + self.group)

    def group_masks(self, blocked: torch.Tensor, g0: int, g1: int, b: int):
        """For chunks g0..g1 of batch row b: ``blocked`` (m, c, L) bool, True where the pair is NOT
        allowed (the composed predicate, ``patterns.compose``); the column ranges that hold a blocked
        pair; the rows with no allowed key (m, c, 1) or None; and |q - k| (m, c, L) for ALiBi."""
        m, span = g1 - g0, self.span
        qp, kp = self.q_pos[g0:g1], self.k_pos[g0:g1]
        local = self.base if self.base is not None else self.pattern.local_allowed(qp, kp, self.dilation)
        kv = self.k_valid[g0:g1, b if self.k_valid.shape[1] > 1 else 0]
        allowed = compose(local, qp, kp, causal=self.pattern.causal, key_valid=kv[:, None, :])
        dist = None if self.slopes is None else (qp - kp).abs()
        if self.G:  # the global keys: every query may attend them (causally), unless they are padding
            gp, gv = self.g_pos[b], self.g_valid[b]
            g_ok = compose(False, qp, gp, causal=self.pattern.causal, key_valid=gv, k_global=gv)
            allowed = torch.cat([allowed.expand(m, self.c, span), g_ok.expand(m, self.c, self.G)], -1)
            if dist is not None:
                dist = torch.cat([dist, (qp - gp).abs()], -1)
        out = blocked[:m]
        torch.logical_not(allowed, out=out)
        dead = ~allowed.any(-1, keepdim=True)
        dead = dead if bool(dead.any()) else None
        # column ranges (one chunk of keys each, plus the global keys) where some pair is masked: only
        # these need masking; inside the band most chunks are wholly allowed
        c = self.c
        whole = allowed[..., :span].reshape(m * c, self.width, c).all(-1).all(0).tolist()
        ranges = [(j * c, (j + 1) * c) for j, ok in enumerate(whole) if not ok]
        if self.G:
            ranges.append((span, self.L))
        return out, ranges, dead, None if dist is None else dist.to(self.dtype)

    def scores(self, S, blocked, ranges, dist, qg, kw, kg, h: int) -> torch.Tensor:
        """S (m, c, L) = q . k (- ALiBi) over the band (and the global keys), -inf where not allowed, in
        place. Masked pairs are overwritten, not added to, so a NaN or inf in a key that a query may not
        attend never reaches that query."""
        m, c, span = S.shape[0], self.c, self.span
        if dist is None:
            S[..., :span].baddbmm_(qg, kw, beta=0)
            if kg is not None:
                S.view(m * c, self.L)[:, span:].addmm_(qg.reshape(m * c, -1), kg.T, beta=0)
        else:
            torch.mul(dist, -self.slopes[h], out=S)
            S[..., :span].baddbmm_(qg, kw)
            if kg is not None:
                S.view(m * c, self.L)[:, span:].addmm_(qg.reshape(m * c, -1), kg.T)
        for a, b in ranges:
            S[..., a:b].masked_fill_(blocked[..., a:b], float("-inf"))
        return S


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """Scores, softmax and products run in fp32 at least (bf16/fp16 inputs are upcast; fp64 stays fp64)."""
    return torch.float32 if x.element_size() < 4 else x.dtype


def _padded(x: torch.Tensor, before: int, total: int, dtype) -> torch.Tensor:
    """(B, H, n, d) -> zero-padded, contiguous (B * H, total, d) in ``dtype``."""
    B, H, n, d = x.shape
    return F.pad(x.to(dtype), (0, 0, before, total - before - n)).reshape(B * H, total, d)


def _windows(x: torch.Tensor, span: int, c: int) -> torch.Tensor:
    """(BH, nk * c, d) -> (BH, nc, d, span): for each query chunk i, its band of keys i*c .. i*c+span-1,
    transposed, as a view (the windows overlap; no copy is made)."""
    return x.unfold(1, span, c)


class _BandAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kg, vg, slopes, geo: BandGeometry):
        with torch.autocast(q.device.type, enabled=False):
            return _BandAttention._forward(ctx, q, k, v, kg, vg, geo, None if slopes is None else slopes.dtype)

    @staticmethod
    def _forward(ctx, q, k, v, kg, vg, geo: BandGeometry, slopes_dtype):
        B, H, n, d = q.shape
        c, nc, nk, L, span, wdt = geo.c, geo.nc, geo.nk, geo.L, geo.span, geo.dtype
        qp = _padded(q, 0, nc * c, wdt).view(B * H, nc, c, d)
        kp, vp = _padded(k, geo.left, nk * c, wdt), _padded(v, geo.left, nk * c, wdt)
        kw, vw = _windows(kp, span, c), _windows(vp, span, c).transpose(-1, -2)
        kg_, vg_ = (None, None) if kg is None else (kg.to(wdt), vg.to(wdt))
        out = torch.empty(B * H, nc, c, d, dtype=wdt, device=q.device)
        S = torch.empty(geo.group, c, L, dtype=wdt, device=q.device)
        bias = torch.empty(geo.group, c, L, dtype=torch.bool, device=q.device)
        for g0, g1 in geo.groups():
            m = g1 - g0
            for b in range(B):
                bias_g, ranges, dead, dist = geo.group_masks(bias, g0, g1, b)
                for h in range(H):
                    bh = b * H + h
                    Sg = geo.scores(S[:m], bias_g, ranges, dist, qp[bh, g0:g1], kw[bh, g0:g1],
                                    None if kg is None else kg_[b, h], h)
                    P = torch.softmax(Sg, dim=-1, out=Sg)
                    if dead is not None:  # rows with every key masked are NaN after softmax: zero them
                        P.masked_fill_(dead, 0.0)
                    o = out[bh, g0:g1]
                    torch.bmm(P[..., :span], vw[bh, g0:g1], out=o)
                    if kg is not None:
                        o.view(m * c, d).addmm_(P.view(m * c, L)[:, span:], vg_[b, h])
        # the padded copies are kept instead of q, k, v (the same memory): backward need not redo them
        ctx.save_for_backward(qp, kp, vp, kg_, vg_, out)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, None if kg is None else kg.dtype)
        ctx.geo = geo
        ctx.slopes_dtype = slopes_dtype
        return out.view(B, H, nc * c, d)[:, :, :n].to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):
            return _BandAttention._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        qp, kp, vp, kg_, vg_, outp = ctx.saved_tensors
        q_dt, k_dt, v_dt, g_dt = ctx.dtypes
        geo: BandGeometry = ctx.geo
        B, H, n, d = geo.B, geo.H, geo.n, qp.shape[-1]
        c, nc, nk, L, span, wdt = geo.c, geo.nc, geo.nk, geo.L, geo.span, geo.dtype
        kg = kg_
        kw, vwT = _windows(kp, span, c), _windows(vp, span, c)
        kwT = kw.transpose(-1, -2)  # (BH, nc, span, d)
        dop = _padded(dout, 0, nc * c, wdt).view(B * H, nc, c, d)
        # -rowsum(dP * P) = -rowsum(dO * O), per query row: dS = P * (dP - D)
        negD = (dop * outp).sum(-1, keepdim=True).neg_()  # (BH, nc, c, 1)
        dq = torch.empty(B * H, nc, c, d, dtype=wdt, device=qp.device)
        dk = torch.zeros(B * H, nk, c, d, dtype=wdt, device=qp.device)
        dv = torch.zeros(B * H, nk, c, d, dtype=wdt, device=qp.device)
        dkg = None if kg is None else torch.zeros_like(kg_)
        dvg = None if kg is None else torch.zeros_like(vg_)
        want_slopes = geo.slopes is not None and ctx.needs_input_grad[5]
        dslopes = torch.zeros(H, dtype=torch.float64) if want_slopes else None
        S = torch.empty(geo.group, c, L, dtype=wdt, device=qp.device)
        dP = torch.empty_like(S)
        bias = torch.empty(geo.group, c, L, dtype=torch.bool, device=qp.device)
        for g0, g1 in geo.groups():
            m = g1 - g0
            for b in range(B):
                bias_g, ranges, dead, dist = geo.group_masks(bias, g0, g1, b)
                for h in range(H):
                    bh = b * H + h
                    Qg, dOg = qp[bh, g0:g1], dop[bh, g0:g1]
                    kgh = None if kg is None else kg_[b, h]
                    P = geo.scores(S[:m], bias_g, ranges, dist, Qg, kw[bh, g0:g1], kgh, h)
                    torch.softmax(P, dim=-1, out=P)  # recomputed exactly as in forward
                    if dead is not None:
                        P.masked_fill_(dead, 0.0)
                    dPg = dP[:m]
                    dPg.copy_(negD[bh, g0:g1].expand(m, c, L))  # dP - D, with dP added by the products
                    dPg[..., :span].baddbmm_(dOg, vwT[bh, g0:g1])
                    if kg is not None:
                        dPg.view(m * c, L)[:, span:].addmm_(dOg.reshape(m * c, d), vg_[b, h].T)
                        dvg[b, h].addmm_(P.view(m * c, L)[:, span:].T, dOg.reshape(m * c, d))
                    # dV and dK of key chunk g+j collect from the j-th slice of each query chunk's band:
                    # for a fixed j the targets are distinct chunks, so they accumulate in place
                    for j in range(geo.width):
                        dv[bh, g0 + j:g1 + j].baddbmm_(P[..., j * c:(j + 1) * c].transpose(1, 2), dOg)
                    dS = dPg.mul_(P)
                    if dslopes is not None:  # d score / d slope_h = -|i - j|
                        dslopes[h] -= (dS * dist).sum(dtype=torch.float64)
                    torch.bmm(dS[..., :span], kwT[bh, g0:g1], out=dq[bh, g0:g1])
                    for j in range(geo.width):
                        dk[bh, g0 + j:g1 + j].baddbmm_(dS[..., j * c:(j + 1) * c].transpose(1, 2), Qg)
                    if kg is not None:
                        dq[bh, g0:g1].view(m * c, d).addmm_(dS.view(m * c, L)[:, span:], kg_[b, h])
                        dkg[b, h].addmm_(dS.view(m * c, L)[:, span:].T, Qg.reshape(m * c, d))
        left = geo.left
        return (dq.view(B, H, nc * c, d)[:, :, :n].to(q_dt),
                dk.view(B, H, nk * c, d)[:, :, left:left + n].to(k_dt),
                dv.view(B, H, nk * c, d)[:, :, left:left + n].to(v_dt),
                None if kg is None else dkg.to(g_dt), None if kg is None else dvg.to(g_dt),
                None if dslopes is None else dslopes.to(ctx.slopes_dtype), None)


def band_attention(q, k, v, pattern: AttentionPattern, pos, *, dilation: int = 1, key_valid=None,
                   kg=None, vg=None, g_pos=None, g_valid=None, alibi_slopes=None, chunk=None):
    """Attention of q (already scaled) over the pattern's band plus optional global keys.

    q, k, v: (B, H, n, d) in the order given by ``pos`` (n,) absolute positions.
    key_valid (B, n): real, non-global keys of the band (global keys come only through kg/vg).
    kg, vg (B, H, G, d), g_pos (B, G), g_valid (B, G): the global keys every query may also attend.
    """
    if torch.compiler.is_compiling():  # torch.compile / torch.export trace the same function as tensor ops
        return traceable_band_attention(q, k, v, pattern, pos, dilation=dilation, key_valid=key_valid, kg=kg,
                                        vg=vg, g_pos=g_pos, g_valid=g_valid, alibi_slopes=alibi_slopes,
                                        chunk=chunk)
    B, H = q.shape[:2]
    geo = BandGeometry(pattern, dilation, pos, key_valid, g_pos, g_valid, alibi_slopes, B, H, chunk,
                       _work_dtype(q))
    return _BandAttention.apply(q, k, v, kg, vg, alibi_slopes, geo)


def traceable_band_attention(q, k, v, pattern: AttentionPattern, pos, *, dilation: int = 1, key_valid=None,
                             kg=None, vg=None, g_pos=None, g_valid=None, alibi_slopes=None, chunk=None):
    """``band_attention`` written for tracers (torch.compile fullgraph, torch.export, ONNX): the same band
    of chunks and the same composed predicate, but one batched product over every chunk, no Python
    branch on tensor values and only ops that take a symbolic length (pad, gather, view). Memory is
    still O(n * w): the band's scores (B, H, nc, c, span + G) are what autograd keeps."""
    B, H, n, d = q.shape
    c, nL, nR = pattern.band(n, chunk)
    nc = (n + c - 1) // c
    span = (nL + 1 + nR) * c
    left, right = nL * c, (-n) % c + nR * c  # pads as a remainder: a tracer can prove them >= 0
    wdt = _work_dtype(q)
    # chunk i's queries are padded positions i*c .. i*c+c-1, its keys i*c .. i*c+span-1 (after ``left``
    # more padding): gathered by index, so no reshape of a symbolic length needs proving divisible
    starts = torch.arange(nc, device=q.device).view(nc, 1) * c
    q_idx = (starts + torch.arange(c, device=q.device)).view(-1)  # (nc * c,)
    k_idx = (starts + torch.arange(span, device=q.device)).view(-1)  # (nc * span,)

    def gather(x, dim, before, after, idx, size):  # pad the sequence dim, take idx, split it per chunk
        x = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [before, after]).index_select(dim, idx)
        return x.view(*x.shape[:dim], nc, size, *x.shape[dim + 1:])

    qc = gather(q.to(wdt), 2, 0, right, q_idx, c)  # (B, H, nc, c, d)
    kb = gather(k.to(wdt), 2, left, right, k_idx, span)  # (B, H, nc, span, d)
    vb = gather(v.to(wdt), 2, left, right, k_idx, span)
    q_pos = gather(pos, 0, 0, right, q_idx, c).unsqueeze(-1)  # (nc, c, 1)
    k_pos = gather(pos, 0, left, right, k_idx, span).unsqueeze(1)  # (nc, 1, span)
    # padded key slots are never valid (padded as floats: ONNX runtimes pad no booleans)
    valid = torch.ones(1, n, dtype=wdt, device=q.device) if key_valid is None else key_valid.to(wdt)
    k_valid = gather(valid, 1, left, right, k_idx, span) > 0.5  # (Bk, nc, span)
    allowed = compose(pattern.local_allowed(q_pos, k_pos, dilation), q_pos, k_pos, causal=pattern.causal,
                      key_valid=k_valid[:, None, :, None, :])  # (Bk, 1, nc, c, span)
    S = qc @ kb.transpose(-1, -2)  # (B, H, nc, c, span)
    if alibi_slopes is not None:
        S = S - alibi_slopes.to(wdt).view(1, H, 1, 1, 1) * (q_pos - k_pos).abs().to(wdt)
    if kg is not None:  # the global keys, after the band
        gp, gv = g_pos.view(B, 1, 1, 1, -1), g_valid.bool().view(B, 1, 1, 1, -1)
        # as (B, H, nc * c, d) products: no broadcast over chunks, which a tracer would guard on
        Sg = (qc.reshape(B, H, nc * c, d) @ kg.to(wdt).transpose(-1, -2)).view(B, H, nc, c, -1)  # (..., G)
        if alibi_slopes is not None:
            Sg = Sg - alibi_slopes.to(wdt).view(1, H, 1, 1, 1) * (q_pos - gp).abs().to(wdt)
        g_ok = compose(False, q_pos, gp, causal=pattern.causal, key_valid=gv, k_global=gv)
        S = torch.cat([S, Sg], -1)
        allowed = torch.cat([allowed.expand(B, 1, nc, c, -1), g_ok.expand(B, 1, nc, c, -1)], -1)
    # a finite fill, not -inf: a row with no allowed key stays finite (then zeroed), in forward and backward
    S = S.masked_fill(~allowed, torch.finfo(wdt).min)
    P = torch.softmax(S, dim=-1) * allowed.any(-1, keepdim=True).to(wdt)
    out = P[..., :span] @ vb  # (B, H, nc, c, d)
    if kg is not None:
        out = out + (P[..., span:].reshape(B, H, nc * c, -1) @ vg.to(wdt)).view(B, H, nc, c, d)
    # the first n rows, taken by index: exactly n for a tracer too
    return out.reshape(B, H, nc * c, d).index_select(2, torch.arange(n, device=q.device)).to(q.dtype)


def dilation_permutation(n: int, d: int, device=None) -> torch.Tensor:
    """Order positions by residue mod d (stable): each residue class becomes contiguous."""
    pos = torch.arange(n, device=device)
    return torch.argsort(torch.remainder(pos, d) * n + pos)
