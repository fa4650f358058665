"""Dropout on CPU without ATen's per-element random draws: what every longctx model's ``nn.Dropout`` is.

ATen's CPU dropout draws one mt19937 number per element (``bernoulli_``, about 6 ns an element here) and keeps
the mask for backward: at 4,096 tokens that was 56 ms of a 600 ms bf16 training step of the bench's
4-layer encoder. ``Dropout`` here draws one 64-bit key per call from PyTorch's generator and takes element
e's keep decision from Philox4x32-10 of (e, key) (``csrc/dropout.cpp``: 16 counters per AVX-512 vector,
about 0.2 ns an element), and backward recomputes the same mask from the key, so nothing is stored.

The same things hold as for ``torch.nn.Dropout``: each element is dropped with probability p and the kept
ones are scaled by 1 / (1 - p); ``torch.manual_seed`` makes a run repeat exactly (the key comes from the
default generator, so gradient checkpointing, which restores the generator, recomputes the same masks); in
eval mode it is the identity. What differs: the masks for a given seed are not ATen's, and they do not
depend on the number of threads. The fast path needs the fused extension loaded (``LONGCTX_FUSED``'s policy,
``attention/dispatch.py``), float32 or bfloat16 CPU tensors, and eager mode; anything else (CUDA, fp16,
torch.compile) runs ``torch.nn.functional.dropout``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """The extension is loaded (``dispatch.extension_ready``) and not turned off."""
    from longctx.attention import dispatch  # here: longctx.attention's layer imports this module

    return dispatch.extension_ready()


def _draw_key() -> int:
    """A 63-bit key from PyTorch's default CPU generator (so ``torch.manual_seed`` fixes it)."""
    return int(torch.empty((), dtype=torch.int64).random_())


class _PhiloxDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, key: int):
        ctx.p, ctx.key = p, key
        return torch.ops.longctx_dropout.dropout(x, p, key)

    @staticmethod
    def backward(ctx, grad):
        # the same mask and scale on the gradient: dropout is linear, so this is also its double backward
        return _PhiloxDropout.apply(grad, ctx.p, ctx.key), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the counter-based mask where the fast path takes ``x``."""
    if not training or p == 0.0:
        return x
    if (not 0.0 < p < 1.0 or x.device.type != "cpu" or x.dtype not in DTYPES or x.numel() == 0
            or torch.compiler.is_compiling() or not available()):
        return F.dropout(x, p, training)  # p = 1 gives zeros there; p outside [0, 1] its error
    return _PhiloxDropout.apply(x, float(p), _draw_key())


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same argument, same state dict: none) on the counter-based CPU path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
