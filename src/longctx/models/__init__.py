"""longctx models, registered with Hugging Face's Auto classes on import."""
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from longctx.models.config import LongctxConfig
from longctx.models.loading import load_longctx_model
from longctx.models.modeling import (
    LongctxForCausalLM,
    LongctxForMaskedLM,
    LongctxForMultipleChoice,
    LongctxForQuestionAnswering,
    LongctxForSequenceClassification,
    LongctxModel,
    LongctxPreTrainedModel,
    question_global_mask,
)

AutoConfig.register("longctx", LongctxConfig, exist_ok=True)
for auto, cls in [(AutoModel, LongctxModel), (AutoModelForMaskedLM, LongctxForMaskedLM),
                  (AutoModelForCausalLM, LongctxForCausalLM),
                  (AutoModelForQuestionAnswering, LongctxForQuestionAnswering),
                  (AutoModelForSequenceClassification, LongctxForSequenceClassification),
                  (AutoModelForMultipleChoice, LongctxForMultipleChoice)]:
    auto.register(LongctxConfig, cls, exist_ok=True)

__all__ = ["LongctxConfig", "LongctxModel", "LongctxPreTrainedModel", "LongctxForMaskedLM",
           "LongctxForCausalLM", "LongctxForQuestionAnswering", "LongctxForSequenceClassification", "LongctxForMultipleChoice",
           "question_global_mask", "load_longctx_model"]
