"""Attention: a registry of mechanisms (mechanism.py), the mask family (patterns as predicates, kernels
proven equal to a dense reference), the approximate families, and the layer."""
from longctx.attention.functional import BACKENDS, attention
from longctx.attention.layer import SelfAttention
from longctx.attention.mechanism import MECHANISMS, Capabilities, LayerContext, Mechanism, build, register
from longctx.attention.patterns import AttentionPattern, full_mask
from longctx.attention.reference import dense_attention

__all__ = ["AttentionPattern", "BACKENDS", "Capabilities", "LayerContext", "MECHANISMS", "Mechanism",
           "SelfAttention", "attention", "build", "dense_attention", "full_mask", "register"]

# every mechanism registers itself on import: one line per file
from longctx.attention import masked  # noqa: E402,F401  (full, sliding, blocks, blockwise_causal)
from longctx.attention import bigbird  # noqa: E402,F401

# the approximate families register themselves on import (one file each)
from longctx.attention import linformer, lsh, nystrom, performer  # noqa: E402,F401
