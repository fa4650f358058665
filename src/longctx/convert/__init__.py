"""Bring existing checkpoints into longctx.

- ``convert_longformer(hf_model)`` / ``longctx convert longformer SRC OUT``: a Hugging Face Longformer
  (base, masked LM, sequence classification, QA) -> the longctx model with the same outputs.
- ``extend_model(hf_model, max_length, window)`` / ``longctx convert extend SRC OUT``: a short BERT or
  RoBERTa -> a long longctx masked LM by Longformer's recipe (copied position table, sliding window,
  global projections initialised from the local ones).
"""
from longctx.convert.extend import extend_dir, extend_model
from longctx.convert.longformer import convert_longformer, convert_longformer_dir

__all__ = ["convert_longformer", "convert_longformer_dir", "extend_model", "extend_dir"]
