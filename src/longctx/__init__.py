"""longctx: a PyTorch toolkit for long-context transformers."""

__version__ = "0.1.0"
