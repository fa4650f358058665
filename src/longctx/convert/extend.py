"""A short BERT or RoBERTa -> a long longctx masked LM, by Longformer's recipe for continuing
RoBERTa's pretraining at 4,096 tokens (Beltagy et al. 2020):

- the learned position table is extended by copying it over and over (RoBERTa's first
  ``pad_token_id + 1`` = 2 rows are reserved, kept once and not copied);
- every layer's attention becomes a sliding window; ``window`` here is two-sided, as Hugging Face's
  ``attention_window`` (a token sees ``window // 2`` tokens on each side);
- the global projections (query_global, key_global, value_global) start as copies of the local ones;
- BERT's ``token_type_embeddings[0]`` is folded into every position row (longctx has no token types).

For inputs no longer than the source's positions and a window covering the whole input, the long model
computes exactly what the short one did. A source without a masked-LM head (``BertModel``, a
sentence-transformers checkpoint) gets a freshly initialised head, so ``longctx pretrain`` can continue
masked-LM pretraining from the output directory.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from longctx.convert.longformer import (
    TOKENIZER_FILES,
    atomic_output_dir,
    build_longctx,
    check_has_weights,
    copy_tokenizer_files,
    encoder_config_fields,
    encoder_state_dict,
    folded_position_table,
    lm_head_state_dict,
    load_hf_model,
    prepare_output,
    read_source_config,
    weight_names,
)
from longctx.errors import LongctxError
from longctx.models import LongctxConfig, LongctxForMaskedLM
from longctx.positions.absolute import extend_learned_positions

log = logging.getLogger("longctx.convert")

SOURCE_TYPES = ("bert", "roberta")
FRESH_HEAD_MESSAGE = ("the source has no masked-LM head: a freshly initialised one was added (decoder tied to "
                      "the word embeddings); continue MLM pretraining (longctx pretrain) before relying on its "
                      "logits")


def position_offset(hf_cfg) -> int:
    """Rows before position 0 in the learned table: RoBERTa counts positions from pad_token_id + 1."""
    return hf_cfg.pad_token_id + 1 if hf_cfg.model_type == "roberta" else 0


def _mlm_head(hf_model: nn.Module):
    """The source's MLM head as a longctx ``lm_head.*`` state dict, or None when it has none."""
    if hasattr(hf_model, "cls") and hasattr(hf_model.cls, "predictions"):  # BertForMaskedLM / ForPreTraining
        return lm_head_state_dict(hf_model.cls.predictions, "transform.dense", "transform.LayerNorm")
    if hasattr(hf_model, "lm_head"):  # RobertaForMaskedLM
        return lm_head_state_dict(hf_model.lm_head)
    return None


def extend_model(hf_model: nn.Module, max_length: int, window: int, **config_overrides) -> LongctxForMaskedLM:
    """An in-memory Hugging Face BERT/RoBERTa (base model or masked LM) -> a ``LongctxForMaskedLM`` of
    ``max_length`` positions with a sliding ``window`` (two-sided, as HF's attention_window) in every
    layer. Sets ``model.fresh_head`` to whether the MLM head had to be initialised."""
    hf_cfg = hf_model.config
    if hf_cfg.model_type not in SOURCE_TYPES:
        raise LongctxError(f"a {hf_cfg.model_type!r} model cannot be extended; give a BERT or RoBERTa checkpoint")
    if not isinstance(window, int) or window < 2 or window % 2:
        raise LongctxError(f"--window {window}: give a positive even number (two-sided, as Hugging Face's "
                           "attention_window; each token sees window/2 tokens on each side)")
    offset = position_offset(hf_cfg)
    learned = hf_cfg.max_position_embeddings - offset
    if not isinstance(max_length, int) or max_length <= learned:
        raise LongctxError(f"--max-length {max_length} is not larger than the source's {learned} positions; "
                           "give a longer length")
    base = hf_model.base_model
    if hf_cfg.model_type == "roberta" and hf_cfg.hidden_act != "gelu" and hasattr(hf_model, "lm_head"):
        log.warning("RoBERTa's MLM head always uses gelu, longctx's uses hidden_act=%r: its logits will differ",
                    hf_cfg.hidden_act)

    table = extend_learned_positions(folded_position_table(base.embeddings), max_length, offset)
    sd = encoder_state_dict(base, "longctx.", table, global_from_local=True)
    head = _mlm_head(hf_model)
    fresh = head is None
    if fresh:
        log.warning(FRESH_HEAD_MESSAGE)
    else:
        sd.update(head)
    fields = encoder_config_fields(hf_cfg)
    if hf_cfg.model_type == "roberta" and fields["sep_token_id"] is None:
        fields["sep_token_id"] = hf_cfg.eos_token_id  # <s> q </s></s> ctx </s>
    # a fresh head is tied to the word embeddings; a kept one stays tied if it was
    tied = fresh or torch.equal(sd["lm_head.decoder.weight"], sd["longctx.embeddings.word_embeddings.weight"])
    fields.update(max_position_embeddings=max_length, position_offset=offset, window=window // 2,
                  tie_word_embeddings=tied, num_labels=2)
    for k in ("id2label", "label2id", "problem_type"):
        fields.pop(k, None)  # the output is a masked LM
    fields.update(config_overrides)
    cfg = LongctxConfig(**fields)
    model = build_longctx(LongctxForMaskedLM, cfg, sd, next(hf_model.parameters()).dtype,
                          fresh_ok=("lm_head.",) if fresh else ())
    model.fresh_head = fresh
    return model


def _source_class(src: Path, hf_cfg):
    """The Hugging Face class to load: the masked LM where the checkpoint has an MLM head, else the
    base model (no pooler: longctx has none)."""
    import transformers

    names = weight_names(src)
    if hf_cfg.model_type == "bert":
        has_head = any(n.startswith("cls.predictions.") for n in names) or any(
            a in ("BertForMaskedLM", "BertForPreTraining") for a in (hf_cfg.architectures or []))
        return (transformers.BertForMaskedLM if has_head else transformers.BertModel), has_head
    has_head = any(n.startswith("lm_head.") for n in names) or "RobertaForMaskedLM" in (hf_cfg.architectures or [])
    return (transformers.RobertaForMaskedLM if has_head else transformers.RobertaModel), has_head


def extend_dir(src: str | os.PathLike, out: str | os.PathLike, max_length: int, window: int,
               force: bool = False) -> dict:
    """``longctx convert extend``: short checkpoint directory ``src`` -> long longctx masked-LM
    directory ``out`` (weights, config, tokenizer with ``model_max_length = max_length``)."""
    src = Path(src)
    hf_cfg = read_source_config(src, "BERT or RoBERTa")
    if hf_cfg.model_type not in SOURCE_TYPES:
        raise LongctxError(f"{str(src)!r} holds a {hf_cfg.model_type!r} model; `convert extend` takes a BERT or "
                           "RoBERTa checkpoint (for a Longformer use `longctx convert longformer`)")
    check_has_weights(src)
    prepare_output(out, force)
    offset = position_offset(hf_cfg)
    learned = hf_cfg.max_position_embeddings - offset
    if max_length <= learned:
        raise LongctxError(f"--max-length {max_length} is not larger than the source's {learned} positions; "
                           "give a longer length")
    cls, _ = _source_class(src, hf_cfg)
    hf_model = load_hf_model(cls, src)
    tokenizer, tok_note = _load_tokenizer(src)
    overrides = {}
    if tokenizer is not None and getattr(tokenizer, "sep_token_id", None) is not None:
        overrides["sep_token_id"] = tokenizer.sep_token_id
    model = extend_model(hf_model, max_length, window, **overrides)
    with atomic_output_dir(out, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.model_max_length = max_length
            tokenizer.save_pretrained(str(tmp))
        elif tok_note:
            copy_tokenizer_files(src, tmp)
    return {"source_class": cls.__name__, "longctx_class": type(model).__name__, "out": str(out),
            "max_position_embeddings": max_length, "window": window, "fresh_head": model.fresh_head,
            "source_positions": learned,
            "tokenizer": (f"saved with model_max_length {max_length}" if tokenizer is not None
                          else tok_note or "none in the source")}


def _load_tokenizer(src: Path):
    """(tokenizer or None, note). No tokenizer files -> (None, ''); unreadable ones -> (None, reason)."""
    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        return None, ""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src), local_files_only=True), ""
    except Exception as e:
        note = f"the tokenizer in {str(src)!r} could not be loaded ({e}); its files were copied unchanged"
        log.warning(note)
        return None, note
