"""Bring existing checkpoints into longctx.

- ``convert_longformer(hf_model)`` / ``longctx convert longformer SRC OUT``: a Hugging Face Longformer
  (base, masked LM, sequence classification, QA) -> the longctx model with the same outputs.
- ``extend_model(hf_model, max_length, window)`` / ``longctx convert extend SRC OUT``: a short BERT or
  RoBERTa -> a long longctx masked LM by Longformer's recipe (copied position table, sliding window,
  global projections initialised from the local ones).
"""
import importlib

# imported on first use (PEP 562): `longctx convert`'s parser lives in this package, and `longctx --help`
# must not wait for torch and transformers
_WHERE = {"convert_longformer": "longformer", "convert_longformer_dir": "longformer", "extend_model": "extend",
          "extend_dir": "extend"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
