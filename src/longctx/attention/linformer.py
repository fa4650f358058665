"""Linformer (Wang et al., 2020, arXiv 2006.04768): keys and values projected along the sequence.

    head_i = softmax(Q (E^T K)^T / sqrt(d)) (F^T V),   E, F: (max_len, k) learned

so a query scores k projected rows instead of n keys: O(n k) time and memory. A sequence shorter than
``max_len`` uses the first n rows of E and F, as the ``linformer`` package does. Padded keys and values
are zeroed before the projection, so padding never leaks into the k rows.

Sharing (the paper's Section 4): ``none`` one E_i, F_i per head; ``headwise`` one E, F per layer for all
heads (the ``linformer`` package's layout); ``kv`` one matrix per layer, E = F; ``layer`` one matrix for
every head, keys, values and every layer of the model. For ``layer`` the model's layer 0 owns the
parameter and the later layers of the same model use it: a model builds its layers in order, so layer
i > 0 takes the parameter of the most recently built layer 0 with the same seed and shape (saved once,
under layer 0). Linformer has no causal form (the projection mixes all positions) and no global tokens.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from longctx.attention.mechanism import Capabilities, LayerContext, Mechanism, register
from longctx.errors import LongctxError

SHARING = ("none", "headwise", "kv", "layer")

# (seed, max_len, k) -> the layer-0 Linformer whose E the later layers of the same model share
_LAYER_OWNERS: dict[tuple, weakref.ref] = {}


@dataclass(frozen=True)
class Spec:
    k: int = 256             # projected length; the paper's k = 256 keeps perplexity at n = 4,096
    share: str = "headwise"  # none | headwise | kv | layer (see the module docstring)

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.share not in SHARING:
            raise ValueError(f"share must be one of {', '.join(SHARING)}, got {self.share!r}")


def _init(shape, k: int, gen: torch.Generator) -> nn.Parameter:
    # the linformer package's init: uniform in +-1/sqrt(k)
    bound = 1 / math.sqrt(k)
    return nn.Parameter((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).float())


@register
class Linformer(Mechanism):
    name = "linformer"
    Spec = Spec
    examples = {"test": {"k": 8}, "bench": {"k": 256, "share": "headwise"}}
    supports = Capabilities()

    def __init__(self, spec: Spec, ctx: LayerContext):
        super().__init__(spec, ctx)
        H, L, k = ctx.num_heads, ctx.max_len, spec.k
        gen = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.layer_idx)
        if spec.share == "none":
            self.E, self.F = _init((H, L, k), k, gen), _init((H, L, k), k, gen)
        elif spec.share == "headwise":
            self.E, self.F = _init((L, k), k, gen), _init((L, k), k, gen)
        elif spec.share == "kv":
            self.E = _init((L, k), k, gen)
        else:
            key = (ctx.seed, L, k)
            owner = _LAYER_OWNERS.get(key, lambda: None)()
            if ctx.layer_idx == 0 or owner is None:
                self.E = _init((L, k), k, gen)
                _LAYER_OWNERS[key] = weakref.ref(self)
            else:
                # a plain attribute, not a registered parameter: the model holds and saves it once (layer 0)
                self.__dict__["_shared_E"] = owner.E

    def projections(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, F) cut to the first n rows: (n, k) or, unshared, (H, n, k)."""
        if n > self.ctx.max_len:
            raise LongctxError(f"linformer: the sequence has {n} tokens but the projection covers max_len = "
                               f"{self.ctx.max_len}; raise max_position_embeddings")
        E = self.__dict__.get("_shared_E", None)
        E = self.E if E is None else E
        F = self.F if self.spec.share in ("none", "headwise") else E
        return E[..., :n, :], F[..., :n, :]

    def _project(self, k, v, key_padding):
        """Keys and values projected along the sequence: (B, H, n, d) -> (B, H, k, d)."""
        E, F = self.projections(k.shape[-2])
        if key_padding is not None:
            keep = key_padding[:, None, :, None].to(k.dtype)  # (B, 1, n, 1)
            k, v = k * keep, v * keep
        eq = "hnk,bhnd->bhkd" if E.dim() == 3 else "nk,bhnd->bhkd"  # per head (share none) or one for all
        return torch.einsum(eq, E.to(k.dtype), k), torch.einsum(eq, F.to(v.dtype), v)

    def forward(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None, cache=None):
        kp, vp = self._project(k, v, key_padding)                       # (B, H, k, d)
        # softmax(q kp^T / sqrt(d)) vp is plain attention over the k projected keys: PyTorch's fused kernel
        # runs it in tiles (fp32 statistics, no (B, H, n, k) scores or probabilities kept; 0.60 s vs 0.80 s
        # fwd+bwd at 32,768 tokens, and no 400 MB tensors to fault in)
        return torch.nn.functional.scaled_dot_product_attention(q, kp.to(q.dtype), vp.to(q.dtype))  # (B, H, n, d)

    def attention_map(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        """A = softmax(Q (E^T K)^T / sqrt(d)) F^T: (B, H, n, n), so A @ V = head output."""
        n, d = q.shape[-2], q.shape[-1]
        E, F = self.projections(n)
        E, F = E.to(q.dtype), F.to(q.dtype)
        keep = torch.ones(q.shape[0], n, dtype=q.dtype) if key_padding is None else key_padding.to(q.dtype)
        keys = E.transpose(-1, -2) @ (k * keep[:, None, :, None])        # (B, H, k, d): row r = sum_j E[j, r] k_j
        probs = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, H, n, k)
        return (probs @ F.transpose(-1, -2)) * keep[:, None, None, :]   # (B, H, n, n); padded keys: 0

    def reference(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        return self.attention_map(q, k, v, key_padding=key_padding) @ v

    def flops(self, n: int, num_global: int = 0) -> float:
        # projecting K and V (2 x 2nkd) plus scores and weighted sum (2 x 2nkd), per head
        return 8.0 * n * self.spec.k * self.ctx.head_dim * self.ctx.num_heads

    def describe(self) -> str:
        return f"linformer k={self.spec.k} share={self.spec.share}"
