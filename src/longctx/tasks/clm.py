"""Causal language modelling (next-token prediction) on a packed corpus: decoders such as LeX.

Judged by the held-out loss per predicted token, its perplexity and bits per character of the
held-out text (comparable across tokenizers)."""
from __future__ import annotations

from longctx.data.collate import CLMCollator
from longctx.models import LongctxForCausalLM
from longctx.tasks.base import register
from longctx.tasks.mlm import LanguageModelTask


@register
class CausalLMTask(LanguageModelTask):
    name = "clm"
    causal = True

    @property
    def model_class(self):
        return LongctxForCausalLM

    def make_collator(self):
        return CLMCollator(self.tokenizer)
