"""Performer / FAVOR+ (Choromanski et al., 2021, arXiv 2009.14794): softmax attention through positive
orthogonal random features.

    exp(q.k / sqrt(d)) ~= phi(q).phi(k),   phi(x) = m^-1/2 exp(W x~ - |x~|^2 / 2),   x~ = x d^-1/4

with W (m, d) Gaussian rows made orthogonal in blocks of d (lower variance than i.i.d. rows). Attention
is then phi(Q) (phi(K)^T V) normalised by phi(Q) (phi(K)^T 1): O(n m d). The feature map is the one of
google-research's fast_attention and the ``performer-pytorch`` package: a stabiliser (the query row's
maximum; for keys, the maximum over the whole sequence) is subtracted inside the exp and ``eps`` = 1e-4
added after, so the stabiliser cancels up to eps.

Bidirectional, the fast path runs over the sequence in chunks of ``chunk`` tokens and recomputes each
chunk's features in backward (``torch.utils.checkpoint``): the (n, m) feature matrices are never held,
so the working set is one chunk's whatever n (at 32k tokens and 12 heads a feature matrix is 400 MB,
and the elementwise passes over it ran 4x slower than on a cached chunk). Each key chunk contributes
its sums under its own stabiliser, rescaled to the sequence's maximum when combined (the online-softmax
trick; ``eps`` is kept apart, as it does not scale), which equals the one-pass formula.

Causal: prefix sums S_i = sum_{j<=i} phi(k_j) v_j^T, z_i = sum_{j<=i} phi(k_j), computed chunk by chunk
(within a chunk a masked m-rank product, across chunks the running state). A key stabiliser taken over
the whole sequence would depend on the future, so the causal form takes it from the first real key, a
key every query sees. The key-value cache of generation is that running state (``PerformerCache``):
constant size (m x d per head) whatever the length.

Features are redrawn during training every ``redraw_interval`` forward calls, from a generator seeded by
(seed, layer, draw number): two runs with the same seed draw the same features; evaluation never redraws.
The projection is a buffer, saved with the model. Padded keys get zero features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from longctx.attention.mechanism import Capabilities, LayerContext, Mechanism, register

EPS = 1e-4  # google-research's and performer-pytorch's kernel epsilon


@dataclass(frozen=True)
class Spec:
    nb_features: int = 256        # m; the paper uses m = 256 for d = 64 (error falls as 1/sqrt(m))
    redraw_interval: int = 1000   # training forward calls between redraws (performer-pytorch's default); 0 = never
    chunk: int = 128              # sequence chunk: causal prefix sums (n/chunk states vs chunk^2 m products);
                                  # bidirectional, the tokens whose features are held at once

    def __post_init__(self):
        for key in ("nb_features", "chunk"):
            val = getattr(self, key)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{key} must be a positive integer, got {val!r}")
        if not isinstance(self.redraw_interval, int) or self.redraw_interval < 0:
            raise ValueError(f"redraw_interval must be 0 (never) or a positive integer, got {self.redraw_interval!r}")


@dataclass
class PerformerCache:
    """The causal running state for generation: pass an empty one with the prompt, then the same object
    with each new token; ``forward`` updates it in place. Size (B, H, m, d) whatever the length."""

    S: torch.Tensor | None = None      # (B, H, m, d): sum of phi(k_j) v_j^T so far
    z: torch.Tensor | None = None      # (B, H, m): sum of phi(k_j) so far
    stab: torch.Tensor | None = None   # (B, H, 1, 1): the key stabiliser, from the first real key
    length: int = 0


def orthogonal_gaussian(m: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """(m, d): blocks of d orthonormal rows (QR of a Gaussian), each row rescaled to the norm of a Gaussian
    vector, so rows are marginally N(0, I) but exactly orthogonal within a block (performer-pytorch's
    gaussian_orthogonal_random_matrix, scaling 0)."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
        blocks.append(Q.T)
    W = torch.cat(blocks)[:m]
    return torch.randn(m, d, generator=gen).norm(dim=1)[:, None] * W


def features(x, W, *, is_query: bool, key_padding=None, stab=None):
    """phi(x): (B, H, n, d) -> (B, H, n, m). Keys: ``stab`` (B, H, 1, 1) given, or the maximum over the
    real keys; padded keys get zero features. Returns (phi, stab) (stab None for queries)."""
    d, m = x.shape[-1], W.shape[0]
    x = x * d ** -0.25
    u = x @ W.to(x.dtype).T                                   # (B, H, n, m)
    h = (x * x).sum(-1, keepdim=True) / 2                     # (B, H, n, 1)
    if is_query:
        return m ** -0.5 * (torch.exp(u - h - u.amax(dim=-1, keepdim=True).detach()) + EPS), None
    real = None if key_padding is None else key_padding[:, None, :, None]  # (B, 1, n, 1)
    if stab is None:
        masked = u if real is None else u.masked_fill(~real, float("-inf"))
        stab = masked.amax(dim=(-1, -2), keepdim=True).detach()           # (B, H, 1, 1)
        stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))  # no real key at all
    phi = m ** -0.5 * (torch.exp(u - h - stab) + EPS)
    return (phi if real is None else phi * real.to(phi.dtype)), stab


def first_key_stabiliser(k, W, key_padding=None):
    """(B, H, 1, 1): the maximum feature logit of each sequence's first real key (causal: seen by all)."""
    d = k.shape[-1]
    first = torch.zeros(k.shape[0], dtype=torch.long) if key_padding is None else \
        key_padding.to(torch.int8).argmax(dim=1)                        # first True (0 when none)
    k0 = k[torch.arange(k.shape[0]), :, first][:, :, None, :]           # (B, H, 1, d)
    return (k0 * d ** -0.25 @ W.to(k.dtype).T).amax(dim=-1, keepdim=True).detach()


def nonzero(den: torch.Tensor) -> torch.Tensor:
    """A query with no real key before it (left padding) has 0 / 0: give it output 0, not NaN, so that its
    discarded row cannot put NaN into the gradients."""
    return den.masked_fill(den == 0, 1.0)


def _key_sums(k, v, W, real):
    """One key chunk's sums under its own stabiliser: k, v (B, H, c, d), real (B, 1, c, 1) float or None.
    Returns (A (B, H, m, d) = sum_j e_j v_j^T, s (B, H, m) = sum_j e_j, stab (B, H, 1, 1)), where
    e_j = exp(u_j - h_j - stab) on real keys (0 on padding) and stab is the chunk's maximum logit over
    its real keys (over all its keys when it has none: then A and s are 0 and its weight is 0)."""
    d = k.shape[-1]
    x = k * d ** -0.25
    u = x @ W.to(x.dtype).T                                                  # (B, H, c, m)
    h = (x * x).sum(-1, keepdim=True) / 2
    with torch.no_grad():
        stab = (u if real is None else u.masked_fill(real == 0, float("-inf"))).amax(dim=(-1, -2), keepdim=True)
        stab = torch.where(torch.isfinite(stab), stab, u.amax(dim=(-1, -2), keepdim=True))
    e = torch.exp(u - h - stab)
    e = e if real is None else e * real
    return e.transpose(-1, -2) @ v, e.sum(-2), stab


def _query_out(q, W, kv, z):
    """One query chunk's output (B, H, c, d) given the key state kv (B, H, m, d) and z (B, H, m)."""
    qf, _ = features(q, W, is_query=True)                                    # (B, H, c, m)
    return (qf @ kv) / nonzero(qf @ z[..., None])


def _chunked(fn, *args):
    """fn(*args), recomputed in backward when a gradient is being recorded (nothing of it kept)."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def bidirectional_linear(q, k, v, W, chunk: int, key_padding=None):
    """phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1) chunk by chunk: (B, H, n, d). Equals ``features`` with
    the sequence's key stabiliser: sum_j m^-1/2 (exp(u_j - h_j - stab) + eps) v_j, split into the exp
    sums (rescaled from each chunk's stabiliser to stab) and eps times the plain sums."""
    m, n = W.shape[0], k.shape[-2]
    real = None if key_padding is None else key_padding[:, None, :, None].to(k.dtype)  # (B, 1, n, 1)
    reals = [None] * math.ceil(n / chunk) if real is None else real.split(chunk, dim=2)
    parts = [_chunked(_key_sums, k_c, v_c, W, r_c) for k_c, v_c, r_c in zip(k.split(chunk, 2), v.split(chunk, 2), reals)]
    stabs = torch.stack([p[2] for p in parts])                               # (chunks, B, H, 1, 1)
    has_real = torch.ones_like(stabs, dtype=torch.bool) if real is None else \
        torch.stack([r_c.amax(dim=(-1, -2), keepdim=True) > 0 for r_c in reals]).expand_as(stabs)
    stab = stabs.masked_fill(~has_real, float("-inf")).amax(dim=0)
    stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))  # no real key at all
    weight = torch.exp(stabs - stab).masked_fill(~has_real, 0.0)             # (chunks, B, H, 1, 1)
    A = sum(w * p[0] for w, p in zip(weight, parts))                         # (B, H, m, d)
    s = sum(w[..., 0] * p[1] for w, p in zip(weight, parts))                 # (B, H, m)
    v_sum = v.sum(-2) if real is None else (v * real).sum(-2)                # (B, H, d)
    count = v.new_full((), n) if real is None else real.sum(dim=(-1, -2))    # (B, 1)
    kv = m ** -0.5 * (A + EPS * v_sum[..., None, :])
    z = m ** -0.5 * (s + EPS * count[..., None])
    return torch.cat([_chunked(_query_out, q_c, W, kv, z) for q_c in q.split(chunk, 2)], dim=2)


def causal_linear(qf, kf, v, chunk: int, S=None, z=None):
    """Causal linear attention by chunked prefix sums. qf, kf (B, H, n, m), v (B, H, n, d); S (B, H, m, d)
    and z (B, H, m) the state before the first token. Returns (out, S, z) with the state after the last."""
    B, H, n, m = qf.shape
    S = qf.new_zeros(B, H, m, v.shape[-1]) if S is None else S
    z = qf.new_zeros(B, H, m) if z is None else z
    outs = []
    for s in range(0, n, chunk):
        q_c, k_c, v_c = qf[..., s:s + chunk, :], kf[..., s:s + chunk, :], v[..., s:s + chunk, :]
        inside = (q_c @ k_c.transpose(-1, -2)).tril()                   # (B, H, c, c): j <= i in the chunk
        num = q_c @ S + inside @ v_c                                    # (B, H, c, d)
        den = q_c @ z[..., None] + inside.sum(-1, keepdim=True)         # (B, H, c, 1)
        outs.append(num / nonzero(den))
        S = S + k_c.transpose(-1, -2) @ v_c
        z = z + k_c.sum(-2)
    return torch.cat(outs, dim=-2), S, z


@register
class Performer(Mechanism):
    name = "performer"
    Spec = Spec
    examples = {"test": {"nb_features": 16}, "bench": {"nb_features": 256}}
    supports = Capabilities(causal=True, cache=True)

    def __init__(self, spec: Spec, ctx: LayerContext):
        super().__init__(spec, ctx)
        self.register_buffer("projection", self._draw(0))             # (m, d)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def _draw(self, number: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(((self.ctx.seed * 1000 + self.ctx.layer_idx) * 100003 + number) % 2**63)
        return orthogonal_gaussian(self.spec.nb_features, self.ctx.head_dim, gen)

    def _maybe_redraw(self):
        """Training only: every redraw_interval forward calls, the next seeded draw."""
        if not self.training or not self.spec.redraw_interval:
            return
        self.calls += 1
        if int(self.calls) % self.spec.redraw_interval == 0:
            self.projection.copy_(self._draw(int(self.calls) // self.spec.redraw_interval))

    def forward(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None, cache=None):
        self._maybe_redraw()
        W = self.projection
        if not self.ctx.causal:
            return bidirectional_linear(q, k, v, W, self.spec.chunk, key_padding)
        qf, _ = features(q, W, is_query=True)                                        # (B, H, n, m)
        if cache is None:
            stab = first_key_stabiliser(k, W, key_padding)
            kf, _ = features(k, W, is_query=False, key_padding=key_padding, stab=stab)
            return causal_linear(qf, kf, v, self.spec.chunk)[0]
        if cache.stab is None:
            cache.stab = first_key_stabiliser(k, W, key_padding)
        kf, _ = features(k, W, is_query=False, key_padding=key_padding, stab=cache.stab)
        out, cache.S, cache.z = causal_linear(qf, kf, v, self.spec.chunk, cache.S, cache.z)
        cache.length += q.shape[-2]
        return out

    def attention_map(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        """(B, H, n, n): phi(Q) phi(K)^T, causally masked, rows normalised."""
        W = self.projection
        qf, _ = features(q, W, is_query=True)
        stab = first_key_stabiliser(k, W, key_padding) if self.ctx.causal else None
        kf, _ = features(k, W, is_query=False, key_padding=key_padding, stab=stab)
        A = qf @ kf.transpose(-1, -2)
        if self.ctx.causal:
            A = A.tril()
        return A / nonzero(A.sum(-1, keepdim=True))

    def reference(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        return self.attention_map(q, k, v, key_padding=key_padding) @ v

    def flops(self, n: int, num_global: int = 0) -> float:
        m, d, H = self.spec.nb_features, self.ctx.head_dim, self.ctx.num_heads
        per_head = 2 * 2.0 * n * m * d + 4.0 * n * m * d    # features of q and k; phi(K)^T V and phi(Q) (.)
        if self.ctx.causal:
            per_head += 2.0 * n * self.spec.chunk * (m + d)  # the masked in-chunk products
        return per_head * H

    def describe(self) -> str:
        return f"performer m={self.spec.nb_features}" + (" causal" if self.ctx.causal else "")
