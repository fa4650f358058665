"""A longctx causal LM under EleutherAI's lm-eval (the optional extra ``longctx-toolkit[lm-eval]``).

``python -m longctx.lm_eval ARGS`` is lm-eval's own command line (``lm_eval ARGS``) run after ``import
longctx``, which registers longctx's model classes with transformers' Auto classes; lm-eval's ``hf`` model
then loads a saved longctx causal LM folder (``longctx pretrain objective=clm``: ``config.json``,
``model.safetensors``, ``tokenizer.json``) as any Hugging Face model::

    python -m longctx.lm_eval --model hf --model_args pretrained=MODEL_DIR --tasks TASKS --device cpu

The plain ``lm_eval`` command does not import longctx, so it cannot load the folder (transformers does
not know ``model_type: longctx``); in a Python script, ``import longctx`` before ``lm_eval.simple_evaluate``
does the same. Importing this module also registers ``--model longctx`` with lm-eval (lm-eval's ``hf``
model with longctx imported first), for scripts that name the model by its own name.
"""
from __future__ import annotations

import sys

from longctx.errors import LongctxError

INSTALL = "pip install 'longctx-toolkit[lm-eval]' (in a clone: pip install -e '.[lm-eval]')"


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise LongctxError(f"running under lm-eval needs lm-eval, which is not installed: {INSTALL}") from None
    return register_model, HFLM


def register() -> None:
    """Register ``longctx`` as an lm-eval model name (idempotent)."""
    import longctx.models  # noqa: F401  (the Auto classes learn model_type "longctx")

    register_model, HFLM = _lm_eval()
    from lm_eval.api.registry import MODEL_REGISTRY

    if "longctx" not in MODEL_REGISTRY:
        @register_model("longctx")
        class LongctxLM(HFLM):  # noqa: F841 - registered by the decorator
            """lm-eval's Hugging Face causal LM with longctx's classes registered."""


def main(argv: list[str] | None = None) -> int:
    import longctx.models  # noqa: F401

    try:
        _lm_eval()
        register()
        from lm_eval.__main__ import cli_evaluate
    except LongctxError as e:
        print(f"python -m longctx.lm_eval: error: {e}", file=sys.stderr)
        return 2
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
