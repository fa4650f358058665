"""Nystromformer (Xiong et al., 2021, arXiv 2102.03902): softmax attention through m landmarks.

    S ~= softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T)      Q~, K~: (m, d) segment means

the Nystrom approximation of the n x n softmax matrix from m columns and m rows; time and memory O(n m).
``pinv`` is the paper's iterative Moore-Penrose inverse (Razavi et al.: 6 iterations, as the authors'
code and Hugging Face). A depthwise convolution over the sequence of each head's values (kernel
``conv_kernel_size``, 0 = none) is added to the output, as in the paper's code.

Padding follows the authors' code (and so Hugging Face's, given zero padded vectors): padded queries,
keys and values are zeroed before the landmark means, padded keys are masked out of softmax(Q~ K^T), and
the convolution sees zeroed values. With m >= n every token is its own landmark and the result is exact
softmax attention (the method's limit; computed directly, as Hugging Face does).

Fast path: kernel_1 (n, m) and kernel_3 (m, n) are never held whole: kernel_3 @ V and
kernel_1 @ (pinv kernel_3 V) are each an attention (landmark queries over the sequence's keys; the
sequence's queries over the landmark keys), run by PyTorch's fused scaled-dot-product kernel, which tiles
them with an online softmax and recomputes in backward. At 32k tokens and 12 heads kernel_1 would be
100 MB, and the passes over such tensors (softmax, its backward, the copies) grew faster than n.

Segments: token i belongs to landmark floor(i m / n), so any n works (equal segments when m divides n,
which is what Hugging Face requires). ``pinv_init``: ``per_head`` starts the iteration from
Z0 = A^T / max column sum of A per sequence and head (Hugging Face's "exact" option: one sequence's
result never depends on the rest of the batch); ``original`` takes that maximum over the whole batch and
all heads, as the authors' code and Hugging Face's default do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from longctx.attention.mechanism import Capabilities, LayerContext, Mechanism, register

PINV_INITS = ("per_head", "original")


@dataclass(frozen=True)
class Spec:
    num_landmarks: int = 64     # the paper's m = 64 is within 1% of full attention on its tasks
    conv_kernel_size: int = 33  # the paper's skip convolution; odd (same length out), 0 = none
    pinv_iterations: int = 6    # Newton-Schulz steps; 6 as the authors' code and Hugging Face
    pinv_init: str = "per_head"

    def __post_init__(self):
        if not isinstance(self.num_landmarks, int) or self.num_landmarks < 1:
            raise ValueError(f"num_landmarks must be a positive integer, got {self.num_landmarks!r}")
        if not isinstance(self.conv_kernel_size, int) or self.conv_kernel_size < 0 or \
                (self.conv_kernel_size and self.conv_kernel_size % 2 == 0):
            raise ValueError(f"conv_kernel_size must be 0 or an odd positive integer, got {self.conv_kernel_size!r}")
        if not isinstance(self.pinv_iterations, int) or self.pinv_iterations < 1:
            raise ValueError(f"pinv_iterations must be a positive integer, got {self.pinv_iterations!r}")
        if self.pinv_init not in PINV_INITS:
            raise ValueError(f"pinv_init must be one of {', '.join(PINV_INITS)}, got {self.pinv_init!r}")


def iterative_pinv(A: torch.Tensor, iterations: int, init: str) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of (..., m, m) row-stochastic A by the paper's iteration:
    Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z)))."""
    colsum = A.sum(dim=-2)  # (..., m)
    scale = colsum.max() if init == "original" else colsum.amax(dim=-1)[..., None, None]
    Z = A.transpose(-1, -2) / scale
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    for _ in range(iterations):
        AZ = A @ Z
        Z = 0.25 * Z @ (13 * eye - AZ @ (15 * eye - AZ @ (7 * eye - AZ)))
    return Z


def landmark_attention(q, k, v, ql, kl, mask, iterations: int, init: str):
    """softmax(Q K~^T) pinv(softmax(Q~ K~^T)) (softmax(Q~ K^T + mask) V): (B, H, n, d). q, k and their
    means ql, kl unscaled (1/sqrt(d) is the products' scale). The two sequence-long factors are each plain
    attention (m landmark queries over n keys; n queries over m landmark keys with values pinv @ kernel_3 V),
    so PyTorch's fused kernel runs them in tiles with fp32 statistics and recomputes in backward: neither
    (n, m) matrix is ever held, and fwd+bwd at 32,768 tokens takes 0.49 s against 0.93 s for the chunked
    online softmax this replaced."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    scale = q.shape[-1] ** -0.5
    kernel_3_v = sdpa(ql, k, v, attn_mask=mask, scale=scale)                # (B, H, m, d)
    kernel_2 = Nystrom._softmax((ql * scale) @ kl.transpose(-1, -2))        # (B, H, m, m)
    T = iterative_pinv(kernel_2, iterations, init) @ kernel_3_v            # (B, H, m, d)
    return sdpa(q, kl, T.to(q.dtype), scale=scale)                          # (B, H, n, d)


def segment_ids(n: int, m: int, device=None) -> torch.Tensor:
    """The landmark of each token: floor(i m / n), contiguous and as equal as n allows."""
    return torch.arange(n, device=device) * m // n


@register
class Nystrom(Mechanism):
    name = "nystrom"
    Spec = Spec
    examples = {"test": {"num_landmarks": 4, "conv_kernel_size": 0},
                "bench": {"num_landmarks": 64, "conv_kernel_size": 33}}
    supports = Capabilities()

    def __init__(self, spec: Spec, ctx: LayerContext):
        super().__init__(spec, ctx)
        K, H = spec.conv_kernel_size, ctx.num_heads
        if K:
            # the same layout as Hugging Face's NystromformerSelfAttention.conv, so weights copy across
            self.conv = nn.Conv2d(H, H, kernel_size=(K, 1), padding=(K // 2, 0), groups=H, bias=False)
            gen = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.layer_idx)
            bound = 1 / math.sqrt(K)  # PyTorch's default conv init bound for fan_in = K
            with torch.no_grad():
                self.conv.weight.copy_(torch.rand(self.conv.weight.shape, generator=gen) * 2 * bound - bound)

    # -- shared pieces -----------------------------------------------------------------------------------
    def _prepare(self, q, k, v, key_padding):
        """Padded rows zeroed; q and k each scaled by d^-1/4 (so scores carry 1/sqrt(d))."""
        if key_padding is not None:
            keep = key_padding[:, None, :, None].to(q.dtype)
            q, k, v = q * keep, k * keep, v * keep
        s = q.shape[-1] ** -0.25
        return q * s, k * s, v

    def _key_mask(self, key_padding, like):
        """Additive (B, 1, 1, n) mask: the dtype's minimum on padded keys (a fully padded row stays finite),
        None without padding."""
        if key_padding is None:
            return None
        zero = torch.zeros(key_padding.shape, dtype=like.dtype, device=like.device)
        return zero.masked_fill(~key_padding, torch.finfo(like.dtype).min)[:, None, None, :]

    @staticmethod
    def _softmax(x, mask=None):
        x = x if mask is None else x + mask
        return torch.softmax(x if x.dtype == torch.float64 else x.float(), dim=-1).to(x.dtype)

    # -- fast path ---------------------------------------------------------------------------------------
    def _segment_means(self, x):
        """(B, H, n, d) -> (B, H, m, d): mean of each landmark's segment."""
        B, H, n, d = x.shape
        m = self.spec.num_landmarks
        if n % m == 0:
            return x.reshape(B, H, m, n // m, d).mean(dim=-2)
        ids = segment_ids(n, m, x.device)
        sums = x.new_zeros(B, H, m, d).index_add(2, ids, x)
        return sums / torch.bincount(ids, minlength=m).to(x.dtype)[:, None]

    def forward(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None, cache=None):
        mask = self._key_mask(key_padding, q)
        if self.spec.num_landmarks >= q.shape[-2]:
            q, k, v = self._prepare(q, k, v, key_padding)
            out = self._softmax(q @ k.transpose(-1, -2), mask) @ v
        else:
            if key_padding is not None:  # padded rows zeroed, as _prepare (its d^-1/4 goes onto the means)
                keep = key_padding[:, None, :, None].to(q.dtype)
                q, k, v = q * keep, k * keep, v * keep
            ql, kl = self._segment_means(q), self._segment_means(k)               # (B, H, m, d)
            out = landmark_attention(q, k, v, ql, kl, mask, self.spec.pinv_iterations, self.spec.pinv_init)
        if self.spec.conv_kernel_size:
            out = out + self.conv(v)
        return out

    # -- reference: the n x n matrix, written out ---------------------------------------------------------
    def attention_map(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        """(B, H, n, n): the Nystrom matrix plus the convolution's band (its Toeplitz matrix)."""
        n = q.shape[-2]
        if self.spec.num_landmarks >= n:
            qs, ks, _ = self._prepare(q, k, v, key_padding)
            A = self._softmax(qs @ ks.transpose(-1, -2), self._key_mask(key_padding, qs))
        else:
            A = self.landmark_matrix(q, k, key_padding)
        if self.spec.conv_kernel_size:
            A = A + self._conv_matrix(n, q.dtype)
        if key_padding is not None:
            A = A * key_padding[:, None, None, :].to(A.dtype)  # values there are zeroed: those columns do nothing
        return A

    def landmark_matrix(self, q, k, key_padding=None):
        """softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T): (B, H, n, n), min(m, n) landmarks, always
        through the landmarks (no m >= n shortcut)."""
        q, k, _ = self._prepare(q, k, k, key_padding)
        n = q.shape[-2]
        m = min(self.spec.num_landmarks, n)
        member = (segment_ids(n, m)[None, :] == torch.arange(m)[:, None]).to(q.dtype)  # (m, n): token in segment
        mean = member / member.sum(dim=-1, keepdim=True)                                  # (m, n) averaging matrix
        ql, kl = mean @ q, mean @ k                                                       # (B, H, m, d)
        kernel_1 = self._softmax(q @ kl.transpose(-1, -2))
        kernel_2 = self._softmax(ql @ kl.transpose(-1, -2))
        kernel_3 = self._softmax(ql @ k.transpose(-1, -2), self._key_mask(key_padding, q))
        return kernel_1 @ iterative_pinv(kernel_2, self.spec.pinv_iterations, self.spec.pinv_init) @ kernel_3

    def _conv_matrix(self, n: int, dtype) -> torch.Tensor:
        """(H, n, n): C[h, i, j] = w_h[j - i + K//2], the convolution as a banded matrix."""
        K = self.spec.conv_kernel_size
        w = self.conv.weight[:, 0, :, 0].to(dtype)                                # (H, K)
        offset = torch.arange(n)[None, :] - torch.arange(n)[:, None] + K // 2     # (n, n)
        inside = (offset >= 0) & (offset < K)
        return torch.where(inside, w[:, offset.clamp(0, K - 1)], torch.zeros((), dtype=dtype))

    def reference(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        return self.attention_map(q, k, v, key_padding=key_padding) @ v

    def flops(self, n: int, num_global: int = 0) -> float:
        m, d, H, K = min(self.spec.num_landmarks, n), self.ctx.head_dim, self.ctx.num_heads, self.spec.conv_kernel_size
        if m >= n:
            return 4.0 * n * n * d * H + 2.0 * n * d * K * H
        # four n x m products (kernel_1, kernel_3, kernel_3 V, kernel_1 (.)), the m x m ones, pinv: 4 products per step
        per_head = 8.0 * n * m * d + 4.0 * m * m * d + 8.0 * m ** 3 * self.spec.pinv_iterations + 2.0 * n * d * K
        return per_head * H

    def describe(self) -> str:
        conv = f" conv={self.spec.conv_kernel_size}" if self.spec.conv_kernel_size else ""
        return f"nystrom landmarks={self.spec.num_landmarks}{conv}"
