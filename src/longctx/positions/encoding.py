"""Position encodings behind one small interface, each used where it acts:

- ``embed(x, positions)``: added to the token embeddings (learned, sinusoidal), in the model;
- ``rotate(q, k, positions)``: applied to queries and keys (RoPE, xPos), in the attention layer;
- ``bias``: an additive score bias ``bias(q_pos, k_pos) -> (H, tq, tk)`` handed to the attention
  mechanism (ALiBi), or None. A bias with a ``slopes`` attribute is linear in |i - j|, which the fast
  kernels take natively; any other callable runs on the dense reference.

Each encoding does nothing in the places it does not act, so the model and the layer call all three
without asking which kind they hold. ``positions`` are integer tensors, (n,) or one row per batch
element (B, n).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longctx.errors import LongctxError
from longctx.positions.absolute import sinusoidal_table
from longctx.positions.alibi import alibi_slopes
from longctx.positions.rotary import Rotary


class PositionEncoding(nn.Module):
    """The interface; the default acts nowhere (``position: none``)."""

    bias = None

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        return q, k


class AbsoluteTable(PositionEncoding):
    """A table of vectors added to the embeddings: learned (BERT/RoBERTa, ``weight`` a parameter) or
    sinusoidal (a fixed buffer). ``offset`` rows are reserved at the start (RoBERTa's 2)."""

    def __init__(self, kind: str, max_positions: int, dim: int, offset: int = 0):
        super().__init__()
        self.kind, self.max_positions, self.offset = kind, max_positions, offset
        if kind == "learned":
            self.weight = nn.Parameter(torch.empty(max_positions + offset, dim).normal_(0.0, 0.02))
        else:
            self.register_buffer("weight", sinusoidal_table(max_positions + offset, dim), persistent=False)

    def embed(self, x, positions):
        # the bound is checked eagerly only: a traced graph (compile, export) may not branch on values
        if positions.numel() and not torch.compiler.is_compiling() and int(positions.max()) >= self.max_positions:
            raise LongctxError(
                f"input of {int(positions.max()) + 1} positions exceeds max_position_embeddings="
                f"{self.max_positions}; use a longer model (longctx convert extend) or relative positions "
                "(rope, alibi, xpos)")
        # F.embedding, not weight[positions]: indexing's backward is a parallel index_put_ with accumulate,
        # whose sum over repeated positions (every row of a batch) changes with thread timing on CPU
        return x + F.embedding(positions + self.offset, self.weight).to(x.dtype)


class RotaryPositions(PositionEncoding):
    """RoPE or xPos: q and k rotated (xPos: also scaled) by their positions."""

    def __init__(self, head_dim: int, base: float, xpos: bool, scale_base: float):
        super().__init__()
        self.rotary = Rotary(head_dim, base, xpos=xpos, scale_base=scale_base)

    def rotate(self, q, k, positions):
        if positions.dim() == 2:  # one row of positions per batch element: (B, 1, n, d) factors
            positions = positions[:, None]
        return self.rotary(q, k, positions)


class ALiBiBias:
    """-m_h * |i - j| as a score bias callable; ``slopes`` (H,) lets the kernels fuse it."""

    def __init__(self, slopes: torch.Tensor):
        self.slopes = slopes

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        dist = (q_pos[..., :, None] - k_pos[..., None, :]).abs().to(self.slopes.dtype)
        return -self.slopes.view(-1, *([1] * dist.dim())) * dist


class ALiBi(PositionEncoding):
    def __init__(self, num_heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    @property
    def bias(self):
        return ALiBiBias(self.slopes)


def in_attention(kind: str, num_heads: int, head_dim: int, *, rope_base: float = 10000.0,
                 xpos_scale_base: float = 512.0) -> PositionEncoding:
    """The part of a position encoding that acts inside the attention layer (rotation or bias)."""
    if kind in ("rope", "xpos"):
        return RotaryPositions(head_dim, rope_base, kind == "xpos", xpos_scale_base)
    if kind == "alibi":
        return ALiBi(num_heads)
    return PositionEncoding()
