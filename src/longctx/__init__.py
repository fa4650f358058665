"""longctx: a PyTorch toolkit for long-context transformers.

Importing longctx registers its models with Hugging Face's Auto classes, so ``AutoModelForMaskedLM``
and friends load a saved longctx directory, and ``attn_implementation="longctx"`` for Hugging Face
models. The registration waits for transformers: it runs as soon as transformers is imported (at once
if it already is), so that ``longctx --help`` and the commands that need neither do not spend seconds
importing torch and transformers.
"""
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register() -> None:
    from longctx import hf, models  # noqa: F401  (each registers on import)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: at transformers' first import, has its loader run ``_register`` right after
    transformers' own module (longctx.models, which imports transformers first thing, may be half
    imported then: it finishes its own registration; longctx.hf and what it imports do not need it)."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register()

            spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformers())
