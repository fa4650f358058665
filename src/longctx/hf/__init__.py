"""Hugging Face integration: ``attn_implementation="longctx"`` for any transformers model whose layers
call the attention interface (registered on import)."""
from longctx.hf.attention_interface import NAME, LongctxMask, longctx_attention_forward, longctx_mask, register

__all__ = ["NAME", "LongctxMask", "longctx_attention_forward", "longctx_mask", "register"]

register()
