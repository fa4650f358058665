"""Cross-entropy for language-model heads on CPU: ``F.cross_entropy(logits.float(), labels)`` in one kernel.

A masked-LM or causal-LM head's loss is a softmax over the vocabulary (30,522 columns for BERT's) for every
predicted token. ATen's path under bf16 autocast copies the logits to fp32, writes and reads back the (N, V)
log-probabilities, and casts their gradient back to bf16: four passes over N x V, 85 ms of a 600 ms bf16
training step of the bench's encoder at 4,096 tokens. ``cross_entropy`` here (``csrc/cross_entropy.cpp``)
reads a row twice in forward (max, sum of exps: the row stays in cache) and once in backward, which writes the
gradient in the logits' dtype; it keeps only each row's log-sum-exp. The arithmetic is fp32 with a 1-ulp exp,
as ATen's fp32 log_softmax. CUDA, other dtypes, torch.compile, or no extension (``LONGCTX_FUSED``'s policy)
run ``F.cross_entropy`` itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx.attention import dispatch

DTYPES = (torch.float32, torch.bfloat16)


class _CrossEntropyRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int):
        loss, lse = torch.ops.longctx_loss.cross_entropy_forward(logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the same gradient in differentiable operations
            keep = labels != ctx.ignore_index
            onehot = F.one_hot(labels.clamp(min=0), logits.shape[1]).float()
            dz = (grad * keep)[:, None] * (torch.softmax(logits.float(), -1) - onehot)
            return dz.to(logits.dtype), None, None
        return (torch.ops.longctx_loss.cross_entropy_backward(grad, logits, labels, lse, ctx.ignore_index),
                None, None)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """-log softmax(logits)[label] of each row (N,), 0 where the label is ``ignore_index``, in fp32, as
    ``F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)``: "none" gives
    the rows, "mean" their mean over the rows not ignored (NaN when every row is). logits (N, V), labels (N)."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if (logits.device.type != "cpu" or logits.dtype not in DTYPES or logits.dim() != 2
            or torch.compiler.is_compiling() or not dispatch.extension_ready()):
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows = _CrossEntropyRows.apply(logits, labels.long(), int(ignore_index))
    return rows if reduction == "none" else rows.sum() / (labels != ignore_index).sum()
