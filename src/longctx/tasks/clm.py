"""Causal language modelling (next-token prediction) on a packed corpus: decoders such as LeX.

Judged by the held-out loss per predicted token, its perplexity and bits per character of the
held-out text (comparable across tokenizers)."""
from __future__ import annotations

from longctx.tasks.base import register
from longctx.tasks.mlm import LanguageModelTask


@register
class CausalLMTask(LanguageModelTask):
    name = "clm"
    causal = True

    @property
    def model_class(self):
        from longctx.models import LongctxForCausalLM
        return LongctxForCausalLM

    def make_collator(self):
        from longctx.data.collate import CLMCollator
        return CLMCollator(self.tokenizer)
