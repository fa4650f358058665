"""longctx: a PyTorch toolkit for long-context transformers.

Importing longctx registers its models with Hugging Face's Auto classes, so ``AutoModelForMaskedLM``
and friends load a saved longctx directory.
"""

__version__ = "0.1.0"

from longctx import models as _models  # noqa: E402,F401  (registers the Auto classes)
from longctx import hf as _hf  # noqa: E402,F401  (attn_implementation="longctx" for Hugging Face models)
