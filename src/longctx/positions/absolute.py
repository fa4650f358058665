"""Absolute positions added to the embeddings: learned (BERT/RoBERTa) and sinusoidal (Vaswani et al.)."""
from __future__ import annotations

import math

import torch
from torch import nn

from longctx.errors import LongctxError


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim))."""
    pos = torch.arange(num_positions, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table


class LearnedPositions(nn.Module):
    """A learned table of ``max_positions`` vectors; positions beyond it are a clear error."""

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_positions, dim) * 0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.numel() and int(positions.max()) >= self.weight.shape[0]:
            raise LongctxError(
                f"position {int(positions.max())} is beyond the learned table of {self.weight.shape[0]} "
                "positions; raise max_positions (longctx convert extend copies the table)")
        return nn.functional.embedding(positions, self.weight)  # deterministic backward (see encoding.py)


def extend_learned_positions(table: torch.Tensor, new_length: int, offset: int = 0) -> torch.Tensor:
    """Longformer's recipe: a longer table made by copying the learned one over and over.

    ``offset`` rows at the start are kept as they are and not repeated (RoBERTa reserves 2: positions
    start at padding_idx + 1). Returns a table of ``new_length + offset`` rows.
    """
    learned = table[offset:]
    if learned.shape[0] == 0:
        raise LongctxError("the position table has no learned rows to copy")
    reps = math.ceil(new_length / learned.shape[0])
    return torch.cat([table[:offset], learned.repeat(reps, 1)[:new_length]], dim=0)
