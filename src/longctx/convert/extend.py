"""A short BERT or RoBERTa -> a long longctx masked LM, by Longformer's recipe for continuing
RoBERTa's pretraining at 4,096 tokens (Beltagy et al. 2020):

- the learned position table is extended by copying it over and over (RoBERTa's first
  ``pad_token_id + 1`` = 2 rows are reserved, kept once and not copied);
- every layer's attention becomes a sliding window of Hugging Face's two-sided ``attention_window``
  (a token sees ``attention_window // 2`` tokens on each side: the one-sided ``window`` of the config);
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
import transformers
from torch import nn
from transformers import AutoTokenizer

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
from longctx.progress import Progress

log = logging.getLogger("longctx.convert")

SOURCE_TYPES = ("bert", "roberta")
FRESH_HEAD_MESSAGE = ("the source has no masked-LM head: a freshly initialised one was added (decoder tied to "
                      "the word embeddings); continue MLM pretraining (longctx pretrain) before relying on its "
                      "logits")


# Peak memory of a conversion, in copies of the long position table (max_length x hidden): measured at
# 2.0 (peak RSS over the RSS before it, 1M and 3M positions, hidden 64: the extended table in the state
# dict and the new model's own table); 3 leaves room for the allocator and the save. Checked by
# tests/test_convert.py::test_extend_memory_estimate_bounds_the_measured_peak.
TABLE_COPIES = 3


def check_attention_window(attention_window) -> None:
    if isinstance(attention_window, bool) or not isinstance(attention_window, int) or attention_window < 2 \
            or attention_window % 2:
        raise LongctxError(f"--attention-window {attention_window}: give a positive even number (two-sided, as "
                           "Hugging Face's attention_window; each token sees attention_window/2 tokens on each side)")


def conversion_bytes(max_length: int, hidden: int, element_bytes: int) -> int:
    """Estimated peak memory (bytes) of extending a model to ``max_length`` positions, the position
    tables alone (the rest of the model does not grow with the length)."""
    return TABLE_COPIES * max_length * hidden * element_bytes


def available_memory_bytes() -> int:
    """Memory this process may still use: MemAvailable from /proc/meminfo, else physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_max_length(max_length, learned: int, hidden: int, element_bytes: int) -> None:
    """Refuse a length that is not longer than the source's, or whose position tables would not fit in
    memory (estimated, so that the run is refused instead of killed by the OOM killer)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= learned:
        raise LongctxError(f"--max-length {max_length} is not larger than the source's {learned} positions; "
                           "give a longer length")
    need, have = conversion_bytes(max_length, hidden, element_bytes), available_memory_bytes()
    if need > have:
        raise LongctxError(f"--max-length {max_length:,} needs about {need / 2**30:,.1f} GiB for its position "
                           f"tables ({max_length:,} x {hidden} values, {TABLE_COPIES} copies) but "
                           f"{have / 2**30:,.1f} GiB are available; give a shorter length")


def _dtype_bytes(hf_cfg) -> int:
    """Bytes per weight of the checkpoint as it will be loaded (its config's dtype, float32 if none)."""
    dtype = getattr(hf_cfg, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4


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


def extend_model(hf_model: nn.Module, max_length: int, attention_window: int,
                 **config_overrides) -> LongctxForMaskedLM:
    """An in-memory Hugging Face BERT/RoBERTa (base model or masked LM) -> a ``LongctxForMaskedLM`` of
    ``max_length`` positions with a sliding window of ``attention_window`` (two-sided, as HF's; the
    config's one-sided ``window`` is half of it) in every layer. Sets ``model.fresh_head`` to whether the
    MLM head had to be initialised."""
    hf_cfg = hf_model.config
    if hf_cfg.model_type not in SOURCE_TYPES:
        raise LongctxError(f"a {hf_cfg.model_type!r} model cannot be extended; give a BERT or RoBERTa checkpoint")
    check_attention_window(attention_window)
    offset = position_offset(hf_cfg)
    check_max_length(max_length, hf_cfg.max_position_embeddings - offset, hf_cfg.hidden_size,
                     next(hf_model.parameters()).element_size())
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
    fields.update(max_position_embeddings=max_length, position_offset=offset, window=attention_window // 2,
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

    names = weight_names(src)
    if hf_cfg.model_type == "bert":
        has_head = any(n.startswith("cls.predictions.") for n in names) or any(
            a in ("BertForMaskedLM", "BertForPreTraining") for a in (hf_cfg.architectures or []))
        return (transformers.BertForMaskedLM if has_head else transformers.BertModel), has_head
    has_head = any(n.startswith("lm_head.") for n in names) or "RobertaForMaskedLM" in (hf_cfg.architectures or [])
    return (transformers.RobertaForMaskedLM if has_head else transformers.RobertaModel), has_head


def extend_dir(src: str | os.PathLike, out: str | os.PathLike, max_length: int, attention_window: int,
               force: bool = False, progress: bool = True) -> dict:
    """``longctx convert extend``: short checkpoint directory ``src`` -> long longctx masked-LM
    directory ``out`` (weights, config, tokenizer with ``model_max_length = max_length``)."""
    src = Path(src)
    hf_cfg = read_source_config(src, "BERT or RoBERTa")
    if hf_cfg.model_type not in SOURCE_TYPES:
        raise LongctxError(f"{str(src)!r} holds a {hf_cfg.model_type!r} model; `convert extend` takes a BERT or "
                           "RoBERTa checkpoint (for a Longformer use `longctx convert longformer`)")
    check_has_weights(src)
    prepare_output(out, force)
    check_attention_window(attention_window)
    learned = hf_cfg.max_position_embeddings - position_offset(hf_cfg)
    # checked before loading: a table of 10^8 positions would be killed by the OOM killer, not refused
    check_max_length(max_length, learned, hf_cfg.hidden_size, _dtype_bytes(hf_cfg))
    cls, _ = _source_class(src, hf_cfg)
    bar = Progress(3, "convert extend", "stages", enabled=progress)  # load, extend, save
    hf_model = load_hf_model(cls, src)
    bar.update(1, stage="loaded")
    tokenizer, tok_note = _load_tokenizer(src)
    overrides = {}
    if tokenizer is not None and getattr(tokenizer, "sep_token_id", None) is not None:
        overrides["sep_token_id"] = tokenizer.sep_token_id
    model = extend_model(hf_model, max_length, attention_window, **overrides)
    bar.update(1, stage="extended")
    with atomic_output_dir(out, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.model_max_length = max_length
            tokenizer.save_pretrained(str(tmp))
        elif tok_note:
            copy_tokenizer_files(src, tmp)
    bar.update(1, stage="saved")
    bar.close()
    return {"source_class": cls.__name__, "longctx_class": type(model).__name__, "out": str(out),
            "max_position_embeddings": max_length, "attention_window": attention_window,
            "window": model.config.window, "fresh_head": model.fresh_head,
            "source_positions": learned,
            "tokenizer": (f"saved with model_max_length {max_length}" if tokenizer is not None
                          else tok_note or "none in the source")}


def _load_tokenizer(src: Path):
    """(tokenizer or None, note). No tokenizer files -> (None, ''); unreadable ones -> (None, reason)."""
    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        return None, ""

    try:
        return AutoTokenizer.from_pretrained(str(src), local_files_only=True, trust_remote_code=False), ""
    except Exception as e:
        reason = "it asks to run custom code, which longctx never does" if "custom code" in str(e) else \
            (str(e).strip().splitlines() or [type(e).__name__])[0]
        note = f"the tokenizer in {str(src)!r} could not be loaded ({reason}); its files were copied unchanged"
        log.warning(note)
        return None, note
