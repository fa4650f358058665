"""LSH attention (Reformer; Kitaev et al., 2020, arXiv 2001.04451): attend within hash buckets.

Angular LSH: a token's bucket is argmax([xR, -xR]) for a random rotation R (d, num_buckets/2), so close
vectors share a bucket. Each of ``n_hashes`` rounds sorts the tokens by (bucket, position), cuts the
sorted sequence into chunks of ``chunk_length`` and lets each chunk attend to itself and
``chunks_before`` / ``chunks_after`` neighbouring chunks (wrapping around, as Reformer does); the rounds
are combined weighted by each round's softmax normaliser (logsumexp), so the result is softmax attention
over the union of what the rounds saw, a key counted as often as it was seen. Cost O(n C) per round.

Shared QK (Reformer): keys are the queries, length-normalised: k_j = q_j / rms(q_j), scores q_i.k_j /
sqrt(d). The mechanism therefore ignores ``k``: the layer must give this mechanism q = k (one shared
projection, Reformer's ``query_key``; building a separate key projection only wastes parameters). A token
never attends to itself (q.k would dominate) unless nothing else is visible: its score is replaced by
-1e5 while masked keys (padding, the future when causal) get -1e9, as in Hugging Face's Reformer.

Fast path: the scores of a chunk against its neighbours are computed ``GROUP`` chunks at a time and
recomputed in backward (``torch.utils.checkpoint``): the (rounds n, 2 chunk_length) score, mask and
probability tensors (400 MB each at 32k tokens and 12 heads) are never held, so their passes stay in
cache; only the sorted q, k, v (linear in n) are.

Any length works: the sequence is padded to a multiple of the chunk with padding tokens, which hash to
an extra last bucket (so they sort after every real token) and are masked as keys. Rotations are drawn
once from a generator seeded by (seed, layer) and kept in a buffer: the same hashing in training and
evaluation, and two builds with the same config hash identically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from longctx.attention.mechanism import Capabilities, LayerContext, Mechanism, register

SELF_VALUE = -1e5    # a token's score on itself: below any real score, above every masked key
MASK_VALUE = -1e9    # padding and future keys
GROUP = 8            # chunks attended at once by the fast path: (B, H, 8, 64, 128) scores, cache-sized


@dataclass(frozen=True)
class Spec:
    chunk_length: int = 64   # Hugging Face's lsh_attn_chunk_length
    num_buckets: int = 64    # even; Reformer's advice: about 2 n / chunk_length
    n_hashes: int = 1        # rounds; more rounds, fewer missed neighbours (the paper: 2-8)
    chunks_before: int = 1
    chunks_after: int = 0

    def __post_init__(self):
        for key in ("chunk_length", "num_buckets", "n_hashes"):
            val = getattr(self, key)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{key} must be a positive integer, got {val!r}")
        if self.num_buckets % 2:
            raise ValueError(f"num_buckets must be even (buckets come from [xR, -xR]), got {self.num_buckets}")
        for key in ("chunks_before", "chunks_after"):
            val = getattr(self, key)
            if not isinstance(val, int) or val < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {val!r}")


def rms_normalise(x: torch.Tensor) -> torch.Tensor:
    """Reformer's shared-QK keys: x / sqrt(mean(x^2) + 1e-6) (Hugging Face's _len_norm)."""
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)


@register
class LSH(Mechanism):
    name = "lsh"
    Spec = Spec
    supports = Capabilities(causal=True)

    def __init__(self, spec: Spec, ctx: LayerContext):
        super().__init__(spec, ctx)
        gen = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.layer_idx)
        # (H, d, n_hashes, num_buckets / 2): Hugging Face's random_rotations layout
        self.register_buffer("rotations", torch.randn(ctx.num_heads, ctx.head_dim, spec.n_hashes,
                                                      spec.num_buckets // 2, generator=gen))

    # -- hashing and sorting (shared by forward and reference) -------------------------------------------
    def _pad(self, q, v, key_padding):
        """Pad to a multiple of chunk_length; returns (q, v, real (B, n_pad) bool)."""
        B, H, n, d = q.shape
        C = self.spec.chunk_length
        pad = -n % C
        real = torch.ones(B, n, dtype=torch.bool, device=q.device) if key_padding is None else key_padding
        if pad:
            q = torch.nn.functional.pad(q, (0, 0, 0, pad))
            v = torch.nn.functional.pad(v, (0, 0, 0, pad))
            real = torch.nn.functional.pad(real, (0, pad), value=False)
        return q, v, real

    def sorted_slots(self, q, real):
        """The rounds' sorted order: (B, H, R * n_pad) slot indices r * n_pad + position, sorted by
        (round, bucket, position); padding in an extra last bucket."""
        B, H, n, _ = q.shape
        nb = self.spec.num_buckets
        rotated = torch.einsum("bhtd,hdkr->bhktr", q.detach(), self.rotations.to(q.dtype))  # (B, H, R, n, nb/2)
        buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)                     # (B, H, R, n)
        buckets = buckets.masked_fill(~real[:, None, None, :], nb)
        rounds = torch.arange(self.spec.n_hashes, device=q.device)[:, None]
        key = (rounds * (nb + 1) + buckets) * n + torch.arange(n, device=q.device)          # unique: a stable sort
        return key.flatten(2).argsort(dim=-1)

    def _scores(self, q, qpos, kpos, kn, real, causal):
        """Scores of queries q at positions qpos on keys kn at kpos, masks applied (Reformer's order)."""
        s = q @ kn.transpose(-1, -2) / math.sqrt(q.shape[-1])
        allowed = real
        if causal:
            allowed = allowed & (qpos[..., :, None] >= kpos[..., None, :])
        s = torch.where(allowed, s, torch.full((), MASK_VALUE, dtype=s.dtype, device=s.device))
        own = qpos[..., :, None] == kpos[..., None, :]
        return torch.where(own, torch.full((), SELF_VALUE, dtype=s.dtype, device=s.device), s)

    # -- fast path: sort, chunk, attend to neighbouring chunks, unsort, combine rounds --------------------
    def forward(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None, cache=None):
        n = q.shape[-2]
        q, v, real = self._pad(q, v, key_padding)
        B, H, n_pad, d = q.shape
        C, R = self.spec.chunk_length, self.spec.n_hashes
        slots = self.sorted_slots(q, real)                           # (B, H, R*n_pad)
        pos = slots % n_pad                                          # token of each sorted slot
        gather = lambda x: x.gather(2, pos[..., None].expand(-1, -1, -1, x.shape[-1]))  # noqa: E731
        N = R * n_pad // C                                           # chunks over all rounds
        qs = gather(q).view(B, H, N, C, d)
        ks, vs = gather(rms_normalise(q)).view(B, H, N, C, d), gather(v).view(B, H, N, C, d)
        ps = pos.view(B, H, N, C)
        rs = real[:, None, :].expand(B, H, n_pad).gather(2, pos).view(B, H, N, C)
        groups = zip(*(self._with_halo(x) for x in (ks, vs, ps, rs)), qs.split(GROUP, dim=2), ps.split(GROUP, dim=2))
        parts = [self._attend_chunks(*g) if not torch.is_grad_enabled() else
                 torch.utils.checkpoint.checkpoint(self._attend_chunks, *g, use_reentrant=False) for g in groups]
        out = torch.cat([p[0] for p in parts], dim=2)                # (B, H, N, C, d)
        logits = torch.cat([p[1] for p in parts], dim=2)             # (B, H, N, C, 1)
        # back to token order, then the rounds weighted by their normalisers
        undo = slots.argsort(dim=-1)
        out = out.view(B, H, R * n_pad, d).gather(2, undo[..., None].expand(-1, -1, -1, d)).view(B, H, R, n_pad, d)
        logits = logits.view(B, H, R * n_pad).gather(2, undo).view(B, H, R, n_pad, 1)
        out = (out * torch.softmax(logits, dim=2)).sum(dim=2)        # (B, H, n_pad, d)
        return out[..., :n, :]

    def _with_halo(self, x):
        """Split the sorted chunks x (B, H, N, C, ...) into groups of GROUP, each with the chunks_before
        chunks before it and chunks_after after it (wrapping around): [(B, H, before + g + after, C, ...)].
        The halos come from one gather, so no group's gradient is a full-size tensor."""
        N, bef, aft = x.shape[2], self.spec.chunks_before, self.spec.chunks_after
        starts = torch.arange(0, N, GROUP, device=x.device)
        ends = (starts + GROUP).clamp(max=N)
        idx = torch.cat([starts[:, None] - torch.arange(bef, 0, -1, device=x.device),
                         ends[:, None] + torch.arange(aft, device=x.device)], dim=1) % N  # (groups, bef + aft)
        halo = x.index_select(2, idx.flatten()).unflatten(2, idx.shape).unbind(2)
        return [torch.cat([h.narrow(2, 0, bef), g, h.narrow(2, bef, aft)], dim=2)
                for h, g in zip(halo, x.split(GROUP, dim=2))]

    def _attend_chunks(self, ks, vs, kpos, rs, qs, ps):
        """g chunks against their neighbours: ks, vs (B, H, before + g + after, C, d) and kpos, rs
        (B, H, before + g + after, C) from ``_with_halo``; qs (B, H, g, C, d), ps (B, H, g, C). Returns
        (out (B, H, g, C, d), logsumexp (B, H, g, C, 1))."""
        g, bef = qs.shape[2], self.spec.chunks_before
        # chunk i sees chunks i - o for o = before .. -after, in that order (Reformer's look-one-back first)
        adjacent = lambda x: torch.cat([x.narrow(2, bef - o, g) for o in range(bef, -self.spec.chunks_after - 1, -1)],  # noqa: E731
                                       dim=3)
        ks, vs, kpos, rs = adjacent(ks), adjacent(vs), adjacent(kpos), adjacent(rs)
        s = self._scores(qs, ps, kpos, ks, rs[..., None, :], self.ctx.causal)
        logits = torch.logsumexp(s, dim=-1, keepdim=True)
        return torch.exp(s - logits) @ vs, logits

    # -- reference: the dense matrix, each key weighted by how often the rounds saw it -------------------
    def visit_counts(self, q, real):
        """(B, H, n_pad, n_pad): M[i, j] = how many times query i's chunks (over all rounds) contain key j."""
        B, H, n_pad, _ = q.shape
        C, R = self.spec.chunk_length, self.spec.n_hashes
        N = R * n_pad // C
        slots = self.sorted_slots(q, real)
        rank = torch.arange(R * n_pad, device=q.device).expand_as(slots)   # place in the sorted order
        chunk = torch.empty_like(slots).scatter_(2, slots, rank // C)
        chunk = chunk.view(B, H, R, n_pad)                            # chunk of token t in round r
        M = torch.zeros(B, H, n_pad, n_pad, dtype=q.dtype, device=q.device)
        for r in range(R):          # query i sits in chunk[r, i] ...
            for r2 in range(R):     # ... and key j appears in round r2's chunk[r2, j]
                gap = (chunk[:, :, r2, None, :] - chunk[:, :, r, :, None]) % N
                for o in range(-self.spec.chunks_before, self.spec.chunks_after + 1):
                    M = M + (gap == o % N).to(q.dtype)
        return M

    def attention_map(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        n = q.shape[-2]
        q, v, real = self._pad(q, v, key_padding)
        ar = torch.arange(q.shape[-2], device=q.device)
        s = self._scores(q, ar, ar, rms_normalise(q), real[:, None, None, :], self.ctx.causal)
        A = torch.softmax(s + self.visit_counts(q, real).log(), dim=-1)  # log 0 = -inf: never seen
        return A[..., :n, :n]

    def reference(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        return self.attention_map(q, k, v, key_padding=key_padding) @ v

    def flops(self, n: int, num_global: int = 0) -> float:
        s = self.spec
        seen = (1 + s.chunks_before + s.chunks_after) * s.chunk_length
        per_round = 4.0 * n * seen * self.ctx.head_dim + 2.0 * n * self.ctx.head_dim * s.num_buckets // 2
        return per_round * s.n_hashes * self.ctx.num_heads

    def describe(self) -> str:
        s = self.spec
        return f"lsh chunk={s.chunk_length} buckets={s.num_buckets} hashes={s.n_hashes}" + \
            (" causal" if self.ctx.causal else "")
