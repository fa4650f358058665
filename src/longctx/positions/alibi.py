"""ALiBi (Press et al., 2022): a per-head linear distance penalty -m_h * |i - j| added to the scores."""
from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The paper's slopes: the geometric sequence starting at 2^(-8/h) with that ratio, for h a power of
    two; otherwise the sequence for the power of two below, plus every other slope of the next one."""
    def power_of_2(h: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(h) - 3)))
        return [start * start ** i for i in range(h)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_2(closest) + alibi_slopes(2 * closest).tolist()[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)
