"""Attention patterns (mask predicates), kernels proven equal to a dense reference, and the layer."""
from longctx.attention.functional import BACKENDS, attention
from longctx.attention.layer import SelfAttention
from longctx.attention.patterns import AttentionPattern, full_mask
from longctx.attention.reference import dense_attention

__all__ = ["AttentionPattern", "BACKENDS", "SelfAttention", "attention", "dense_attention", "full_mask"]

# the approximate families register themselves on import (one file each)
from longctx.attention import linformer, nystrom  # noqa: E402,F401
