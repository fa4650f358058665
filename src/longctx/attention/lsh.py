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

Fast path: the scores of a chunk against its neighbours are computed ``STEP`` chunks at a time and
recomputed in backward (``_ChunkSteps``, FlashAttention's recompute with the row max and sum kept; their
logsumexp weights the rounds): the (rounds n, 2 chunk_length) score, mask and probability
tensors (400 MB each at 32k tokens and 12 heads) are never held, so their passes stay in cache; only
the sorted q, k, v (linear in n) are, and each step's neighbour chunks are gathered by index and their
gradients added back by index (no halo copies of the sequence). The sort and its undoing are row
permutations (``_Rows``: whole rows copied by ``index_select``; the backward of each is the other
permutation, a gather again, where autograd's ``gather`` backward is a scatter-add twice as slow), the
sort is one radix sort of flat integer keys, and past ``BLOCK_TOKENS`` rows the heads go through one at a
time, so that the passes over the (rounds x rows) tensors stay near cache size as n grows: the layer at
32,768 tokens took 4.84 s with elementwise gathers over all heads at once, 3.7-4.0 s so (4,096: 0.49 ->
0.46-0.47 s).

Any length works: the sequence is padded to a multiple of the chunk with padding tokens, which hash to
an extra last bucket (so they sort after every real token) and are masked as keys. Rotations are drawn
once from a generator seeded by (seed, layer) and kept in a buffer: the same hashing in training and
evaluation, and two builds with the same config hash identically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longctx.attention.functional import empty_batch
from longctx.attention.mechanism import Capabilities, LayerContext, Mechanism, register

SELF_VALUE = -1e5    # a token's score on itself: below any real score, above every masked key
MASK_VALUE = -1e9    # padding and future keys
STEP = 96            # (batch, head, chunk) triples attended at once: (1, 12, 8, 64, 128) scores, cache-sized
BLOCK_TOKENS = 4096 * 12  # (batch, head, token) rows up to which the fast path takes every head at once


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
    examples = {"test": {"chunk_length": 8, "num_buckets": 4},
                "bench": {"chunk_length": 64, "num_buckets": 64, "n_hashes": 2}}
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

    def sorted_slots(self, q, real, heads: slice = slice(None)):
        """The rounds' sorted order: (B, H, R * n_pad) slot indices r * n_pad + position, sorted by
        (round, bucket, position); padding in an extra last bucket. q holds the heads ``heads``."""
        B, H, n, _ = q.shape
        nb = self.spec.num_buckets
        rotations = self.rotations[heads].to(q.dtype)
        rotated = torch.einsum("bhtd,hdkr->bhktr", q.detach(), rotations)                    # (B, H, R, n, nb/2)
        # argmax over [xR, -xR] without building it: the largest rotated value, or nb/2 + the smallest
        top, top_at = rotated.max(dim=-1)
        low, low_at = rotated.min(dim=-1)
        buckets = torch.where(top >= -low, top_at, low_at + nb // 2)                         # (B, H, R, n)
        buckets = buckets.masked_fill(~real[:, None, None, :], nb)
        rounds = torch.arange(self.spec.n_hashes, device=q.device)[:, None]
        key = ((rounds * (nb + 1) + buckets) * n + torch.arange(n, device=q.device)).flatten(2)  # unique per head
        # one sort of a flat tensor, each (batch, head) offset past the one before: ATen sorts 1-D integer
        # keys by radix, O(n), where a batched argsort compares (O(n log n), 19x the time at 8x the tokens)
        span = self.spec.n_hashes * (nb + 1) * n
        offset = torch.arange(B * H, device=q.device).view(B, H, 1) * span
        order = (key + offset).flatten().sort(stable=True).indices.view(B, H, -1)
        return order - torch.arange(B * H, device=q.device).view(B, H, 1) * key.shape[-1]

    def _scores(self, q, qpos, kpos, kn, real, causal):
        """Scores of queries q at positions qpos on keys kn at kpos, masks applied (Reformer's order),
        and where they are the product's (neither masked nor a token on itself: a constant there)."""
        s = q @ kn.transpose(-1, -2) / math.sqrt(q.shape[-1])
        allowed = real
        if causal:
            allowed = allowed & (qpos[..., :, None] >= kpos[..., None, :])
        s = torch.where(allowed, s, torch.full((), MASK_VALUE, dtype=s.dtype, device=s.device))
        own = qpos[..., :, None] == kpos[..., None, :]
        return torch.where(own, torch.full((), SELF_VALUE, dtype=s.dtype, device=s.device), s), allowed & ~own

    # -- fast path: sort, chunk, attend to neighbouring chunks, unsort, combine rounds --------------------
    def forward(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None, cache=None):
        if q.shape[0] == 0:  # the sort and the steps size their work by the batch
            return empty_batch(q, k, v)
        n = q.shape[-2]
        q, v, real = self._pad(q, v, key_padding)
        B, H, n_pad, d = q.shape
        # all heads at once while they hold at most BLOCK_TOKENS (batch, head, token) rows, else one head at a
        # time: every pass below is over tensors of R x that many rows, which then stay near cache size as
        # n grows (layer fwd+bwd, 2 cores: 16,384 tokens 2.02 s with blocks of 3 heads, 1.88 s of one;
        # 32,768 4.5 s with all 12, 4.4 s with 3, 3.7-3.9 s with one; 4,096: 0.46-0.47 s all at once,
        # 0.49-0.50 s in blocks of 4)
        hb = H if B * H * n_pad <= BLOCK_TOKENS else 1
        # split, not slicing: one backward for all blocks (a slice's backward would zero a full-size gradient)
        outs = [self._heads(qh, vh, real, slice(h, h + hb))
                for h, qh, vh in zip(range(0, H, hb), q.split(hb, dim=1), v.split(hb, dim=1))]
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))[..., :n, :]

    def _heads(self, q, v, real, heads: slice):
        """The fast path for the heads ``heads`` (q, v padded)."""
        B, H, n_pad, d = q.shape
        C, R = self.spec.chunk_length, self.spec.n_hashes
        slots = self.sorted_slots(q, real, heads)                    # (B, H, R*n_pad)
        pos = slots % n_pad                                          # token of each sorted slot
        undo = torch.empty_like(slots).scatter_(2, slots, torch.arange(R * n_pad, device=q.device).expand_as(slots))
        # the sort and its undoing as row permutations of flat (rows, d) views: whole rows are copied, and
        # each one's backward is the other permutation (a gather, where scatter-adds were 2x slower)
        base = torch.arange(B * H, device=q.device).view(B, H, 1) * (R * n_pad)
        sort_rows = (base // R + pos).flatten()                     # row of q (B H n_pad rows) per sorted slot
        undo_rows = (base + undo).flatten()                          # sorted row of slot r n_pad + t
        N = R * n_pad // C                                           # chunks over all rounds
        qs = _Rows.apply(q, sort_rows, undo_rows, R).view(B, H, N, C, d)
        ks = _Rows.apply(rms_normalise(q), sort_rows, undo_rows, R).view(B, H, N, C, d)
        vs = _Rows.apply(v, sort_rows, undo_rows, R).view(B, H, N, C, d)
        ps = pos.view(B, H, N, C)
        rs = real[:, None, :].expand(B, H, n_pad).gather(2, pos).view(B, H, N, C)
        out, logits = _ChunkSteps.apply(qs, ks, vs, ps, rs, self)  # (B, H, N, C, d), (B, H, N, C, 1)
        # back to token order, then the rounds weighted by their normalisers
        out = _Rows.apply(out.view(B, H, R * n_pad, d), undo_rows, (base + slots).flatten(), 1).view(B, H, R, n_pad, d)
        logits = logits.view(B, H, R * n_pad).gather(2, undo).view(B, H, R, n_pad, 1)
        return (out * torch.softmax(logits, dim=2)).sum(dim=2)       # (B, H, n_pad, d)

    def neighbours(self, i0: int, i1: int, N: int, device) -> torch.Tensor:
        """(g, before + 1 + after): the chunks each of chunks i0..i1 attends, in order (Reformer's
        look-one-back first), wrapping around the N chunks."""
        offsets = torch.arange(-self.spec.chunks_before, self.spec.chunks_after + 1, device=device)
        return (torch.arange(i0, i1, device=device)[:, None] + offsets) % N

    def attend_step(self, qs, ks, vs, ps, rs, i0, i1, stats=None):
        """Chunks i0..i1 against their neighbours: probabilities (B, H, g, C, W C), live mask, neighbour
        keys and values (B, H, g, W C, d), and the row statistics (max m, sum of exp(s - m); computed
        unless given). The probabilities are exp(s - m) / sum, not exp(s - logsumexp): a row that sees
        only its own token has scores and logsumexp near SELF_VALUE, where fp32's spacing (2^-7) would
        put 0.2% into every weight; s - m is exact there."""
        B, H, N, C, d = ks.shape
        nbr = self.neighbours(i0, i1, N, ks.device)
        take = lambda x: x[:, :, nbr].flatten(3, 4)  # noqa: E731  (B, H, g, W, C, ...) -> (B, H, g, W C, ...)
        kk, vv = take(ks), take(vs)
        s, live = self._scores(qs[:, :, i0:i1], ps[:, :, i0:i1], take(ps), kk, take(rs)[..., None, :],
                               self.ctx.causal)
        if stats is None:
            m = s.amax(-1, keepdim=True)
            p = torch.exp(s - m)
            stats = (m, p.sum(-1, keepdim=True))
            return p.div_(stats[1]), live, kk, vv, stats, nbr
        m, total = stats
        return torch.exp(s - m).div_(total), live, kk, vv, stats, nbr

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
        s, _ = self._scores(q, ar, ar, rms_normalise(q), real[:, None, None, :], self.ctx.causal)
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


class _Rows(torch.autograd.Function):
    """y = the rows ``rows`` of x (B, H, m, d) seen as (B H m, d): (B, H, R m, d), every row of x taken
    once per round. ``back`` is its inverse: y's row holding x's row t of round r, (B, H, R, m) flat, so
    dx = the sum over rounds of dy's rows ``back``."""

    @staticmethod
    def forward(ctx, x, rows, back, R: int):
        B, H, m, d = x.shape
        ctx.save_for_backward(back)
        ctx.shape, ctx.R = x.shape, R
        return x.reshape(-1, d).index_select(0, rows).view(B, H, R * m, d)

    @staticmethod
    def backward(ctx, dy):
        (back,) = ctx.saved_tensors
        B, H, m, d = ctx.shape
        dx = dy.reshape(-1, d).index_select(0, back).view(B, H, ctx.R, m, d)
        return dx.sum(2) if ctx.R > 1 else dx.view(B, H, m, d), None, None, None


class _ChunkSteps(torch.autograd.Function):
    """Every sorted chunk against its neighbours, STEP / (B H) chunks at a time; only the output and the row
    statistics are kept (and the logsumexp returned for the rounds' weights), backward recomputes each step's probabilities and adds the key and value
    gradients into their chunks (no halo copies, no per-step full-size gradients)."""

    @staticmethod
    def forward(ctx, qs, ks, vs, ps, rs, mech: LSH):
        N = qs.shape[2]
        out = torch.empty_like(qs)
        m, total = qs.new_empty(qs.shape[:-1] + (1,)), qs.new_empty(qs.shape[:-1] + (1,))
        group = max(1, STEP // (qs.shape[0] * qs.shape[1]))
        steps = [(i, min(N, i + group)) for i in range(0, N, group)]
        for i0, i1 in steps:
            p, _, _, vv, (m[:, :, i0:i1], total[:, :, i0:i1]), _ = mech.attend_step(qs, ks, vs, ps, rs, i0, i1)
            out[:, :, i0:i1] = p @ vv
        ctx.save_for_backward(qs, ks, vs, ps, rs, out, m, total)
        ctx.mech, ctx.steps = mech, steps
        return out, m + total.log()

    @staticmethod
    def backward(ctx, dout, dlse):
        qs, ks, vs, ps, rs, out, m, total = ctx.saved_tensors
        B, H, N, C, d = qs.shape
        scale = d ** -0.5
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(m) if dlse is None else dlse
        # d lse / d s = P, so dS = P (dP - rowsum(dO O) + dlse)
        shift = dlse - (dout * out).sum(-1, keepdim=True)
        dq, dk, dv = torch.empty_like(qs), torch.zeros_like(ks), torch.zeros_like(vs)
        for i0, i1 in ctx.steps:
            p, live, kk, vv, _, nbr = ctx.mech.attend_step(qs, ks, vs, ps, rs, i0, i1,
                                                           (m[:, :, i0:i1], total[:, :, i0:i1]))
            do_ = dout[:, :, i0:i1]
            ds = torch.where(live, p * (do_ @ vv.transpose(-1, -2) + shift[:, :, i0:i1]), 0.0) * scale
            dq[:, :, i0:i1] = ds @ kk
            rows = nbr.flatten()  # the key chunks of this step, in the order of kk's (g, W) blocks
            dk.index_add_(2, rows, (ds.transpose(-1, -2) @ qs[:, :, i0:i1]).unflatten(3, (-1, C)).flatten(2, 3))
            dv.index_add_(2, rows, (p.transpose(-1, -2) @ do_).unflatten(3, (-1, C)).flatten(2, 3))
        return dq, dk, dv, None, None, None
