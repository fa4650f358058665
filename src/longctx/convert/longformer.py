"""Hugging Face Longformer -> longctx, with outputs unchanged.

A Longformer layer is a RoBERTa layer whose self-attention has a second set of projections for global
tokens; longctx's ``Block`` has the same parts under other names, so conversion is a renaming plus two
folds:

- Longformer adds ``token_type_embeddings[0]`` to every token (longctx has no token types): the vector
  is added to every row of the position table, which gives the same sum before the embedding norm.
- RoBERTa-style positions start at ``pad_token_id + 1``: those rows stay in the table and
  ``position_offset = pad_token_id + 1`` skips them, so position 0 of longctx reads the same row.
- ``attention_window`` is two-sided in Hugging Face; longctx's ``window`` is one-sided: ``aw // 2``.

The helpers here (reading a source directory, mapping an encoder's weights, writing an output directory
atomically) are shared with ``longctx.convert.extend`` (BERT/RoBERTa layers have the same names).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from longctx.errors import LongctxError
from longctx.io import publish_dir
from longctx.progress import Progress
from longctx.models import (
    LongctxConfig,
    LongctxForMaskedLM,
    LongctxForQuestionAnswering,
    LongctxForSequenceClassification,
    LongctxModel,
)

log = logging.getLogger("longctx.convert")

# Hugging Face class name -> (longctx class, head kind)
LONGFORMER_CLASSES = {
    "LongformerModel": (LongctxModel, "base"),
    "LongformerForMaskedLM": (LongctxForMaskedLM, "mlm"),
    "LongformerForSequenceClassification": (LongctxForSequenceClassification, "classification"),
    "LongformerForQuestionAnswering": (LongctxForQuestionAnswering, "qa"),
}

# files a tokenizer may consist of (copied as they are)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "sentencepiece.bpe.model", "spiece.model",
                   "tokenizer.model")


# ---------------------------------------------------------------------------------------------------
# reading a source checkpoint directory
# ---------------------------------------------------------------------------------------------------
def read_source_config(src: str | os.PathLike, what: str):
    """The Hugging Face config of checkpoint directory ``src``, or a LongctxError saying what is wrong."""

    src = Path(src)
    if not src.exists():
        raise LongctxError(f"source checkpoint {str(src)!r} does not exist; give the directory of a {what} "
                           "checkpoint (config.json and weights)")
    if not src.is_dir() or not (src / "config.json").is_file():
        raise LongctxError(f"source {str(src)!r} is not a Hugging Face checkpoint directory (no config.json); "
                           f"give the directory of a {what} checkpoint")
    try:
        # never run code from the folder: an auto_map beside a .py would otherwise prompt on a terminal
        return AutoConfig.from_pretrained(str(src), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # malformed JSON, unknown model_type, custom code, ...
        reason = "it asks to run custom code, which longctx never does" if "custom code" in str(e) else \
            (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LongctxError(f"cannot read {str(src / 'config.json')!r} as a Hugging Face config ({reason}); "
                           f"give the directory of a {what} checkpoint") from None


def weight_names(src: str | os.PathLike) -> list[str]:
    """Parameter names stored in the checkpoint (safetensors, or the index of a sharded checkpoint)."""
    src = Path(src)
    names: list[str] = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            with open(src / index) as f:
                names += list(json.load(f).get("weight_map", {}))
    if (src / "model.safetensors").is_file():
        with safe_open(str(src / "model.safetensors"), framework="pt") as f:
            names += list(f.keys())
    return names


def check_has_weights(src: Path) -> None:
    if not any((src / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json",
                                            "pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise LongctxError(f"source {str(src)!r} has a config but no weights (model.safetensors or "
                           "pytorch_model.bin); give a complete checkpoint directory")


def load_hf_model(cls, src: Path):
    """``cls.from_pretrained`` from local files only; weights as safetensors, or .bin via weights_only."""
    try:
        return cls.from_pretrained(str(src), local_files_only=True, trust_remote_code=False).eval()
    except LongctxError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LongctxError(f"cannot load the checkpoint in {str(src)!r} as {cls.__name__} ({reason})") from None


# ---------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------
def _put(sd: dict, name: str, module: nn.Module) -> None:
    sd[name + ".weight"] = module.weight.detach().clone()
    if getattr(module, "bias", None) is not None:
        sd[name + ".bias"] = module.bias.detach().clone()


def folded_position_table(embeddings: nn.Module) -> torch.Tensor:
    """The learned position table with ``token_type_embeddings[0]`` added to every row."""
    table = embeddings.position_embeddings.weight.detach().clone()
    tt = getattr(embeddings, "token_type_embeddings", None)
    if tt is not None:
        table += tt.weight.detach()[0]
    return table


def encoder_state_dict(base: nn.Module, prefix: str, position_table: torch.Tensor,
                       global_from_local: bool = False) -> dict[str, torch.Tensor]:
    """longctx ``LongctxModel`` weights (under ``prefix``) from a Hugging Face BERT-family encoder
    (``LongformerModel``, ``BertModel``, ``RobertaModel``): same parts, other names.

    ``global_from_local``: the source has no global projections (BERT/RoBERTa); copy the local ones,
    as Longformer did to start its continued pretraining from RoBERTa."""
    sd: dict[str, torch.Tensor] = {}
    emb = base.embeddings
    _put(sd, prefix + "embeddings.word_embeddings", emb.word_embeddings)
    sd[prefix + "embeddings.position_embeddings.weight"] = position_table
    _put(sd, prefix + "embeddings.norm", emb.LayerNorm)
    for i, layer in enumerate(base.encoder.layer):
        p, att = f"{prefix}layers.{i}.", layer.attention.self
        for name in ("query", "key", "value"):
            _put(sd, p + "attention." + name, getattr(att, name))
            _put(sd, p + f"attention.{name}_global", getattr(att, name if global_from_local else name + "_global"))
        _put(sd, p + "attention.out", layer.attention.output.dense)
        _put(sd, p + "attention_norm", layer.attention.output.LayerNorm)
        _put(sd, p + "intermediate", layer.intermediate.dense)
        _put(sd, p + "output", layer.output.dense)
        _put(sd, p + "output_norm", layer.output.LayerNorm)
    return sd


def encoder_config_fields(hf_cfg) -> dict:
    """The LongctxConfig fields every BERT-family encoder shares."""
    if getattr(hf_cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise LongctxError(f"position_embedding_type={hf_cfg.position_embedding_type!r} is not supported; "
                           "only absolute learned positions convert")
    if not isinstance(hf_cfg.hidden_act, str):
        raise LongctxError("hidden_act must be the name of an activation to convert")
    fields = dict(
        vocab_size=hf_cfg.vocab_size, hidden_size=hf_cfg.hidden_size, num_hidden_layers=hf_cfg.num_hidden_layers,
        num_attention_heads=hf_cfg.num_attention_heads, intermediate_size=hf_cfg.intermediate_size,
        hidden_act=hf_cfg.hidden_act, hidden_dropout_prob=hf_cfg.hidden_dropout_prob, norm="post",
        layer_norm_eps=hf_cfg.layer_norm_eps, initializer_range=hf_cfg.initializer_range, position="learned",
        attention="sliding", global_projections=True, pad_token_id=hf_cfg.pad_token_id,
        bos_token_id=getattr(hf_cfg, "bos_token_id", None), eos_token_id=getattr(hf_cfg, "eos_token_id", None),
        sep_token_id=getattr(hf_cfg, "sep_token_id", None),
        tie_word_embeddings=getattr(hf_cfg, "tie_word_embeddings", True),
        classifier_dropout=getattr(hf_cfg, "classifier_dropout", None),
    )
    # classification labels travel with the config
    for k in ("id2label", "label2id", "problem_type"):
        if getattr(hf_cfg, k, None) is not None:
            fields[k] = getattr(hf_cfg, k)
    return fields


def lm_head_state_dict(lm_head: nn.Module, dense: str = "dense", norm: str = "layer_norm") -> dict:
    """longctx ``lm_head.*`` from a RoBERTa/Longformer ``lm_head`` (or BERT's ``cls.predictions`` with
    dense/norm names ``transform.dense``/``transform.LayerNorm``)."""
    sd: dict[str, torch.Tensor] = {}
    _put(sd, "lm_head.dense", lm_head.get_submodule(dense))
    _put(sd, "lm_head.norm", lm_head.get_submodule(norm))
    sd["lm_head.decoder.weight"] = lm_head.decoder.weight.detach().clone()
    bias = lm_head.decoder.bias if lm_head.decoder.bias is not None else lm_head.bias
    sd["lm_head.decoder.bias"] = bias.detach().clone()
    return sd


def build_longctx(cls, cfg: LongctxConfig, sd: dict, dtype: torch.dtype, fresh_ok: tuple[str, ...] = ()):
    """Instantiate ``cls(cfg)`` and load ``sd``; every parameter must come from ``sd`` except those whose
    names start with one of ``fresh_ok`` (kept as initialised)."""
    model = cls(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(fresh_ok)]
    if cfg.tie_word_embeddings:  # the tied decoder is the word embedding table
        missing = [k for k in missing if k != "lm_head.decoder.weight"]
    if missing or unexpected:
        raise RuntimeError(f"conversion bug: missing {missing}, unexpected {unexpected}")
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------------
# Longformer
# ---------------------------------------------------------------------------------------------------
def longformer_config(hf_cfg, **extra) -> LongctxConfig:
    """The LongctxConfig of a Hugging Face LongformerConfig."""
    aw = hf_cfg.attention_window
    aw = list(aw) if isinstance(aw, (list, tuple)) else [aw] * hf_cfg.num_hidden_layers
    if len(aw) != hf_cfg.num_hidden_layers:
        raise LongctxError(f"attention_window lists {len(aw)} values for {hf_cfg.num_hidden_layers} layers")
    for w in aw:
        if w <= 0 or w % 2:
            raise LongctxError(f"attention_window values must be positive and even, got {w}")
    offset = hf_cfg.pad_token_id + 1
    if hf_cfg.max_position_embeddings <= offset:
        raise LongctxError(f"max_position_embeddings={hf_cfg.max_position_embeddings} leaves no learned positions")
    fields = encoder_config_fields(hf_cfg)
    fields.update(max_position_embeddings=hf_cfg.max_position_embeddings - offset, position_offset=offset,
                  window=[w // 2 for w in aw], num_labels=hf_cfg.num_labels)
    fields.update(extra)
    return LongctxConfig(**fields)


def convert_longformer(hf_model: nn.Module):
    """An in-memory Hugging Face Longformer (``LongformerModel``, ``...ForMaskedLM``,
    ``...ForSequenceClassification``, ``...ForQuestionAnswering``) -> the longctx model with the same
    outputs (in eval mode) on every real token."""
    name = type(hf_model).__name__
    if name not in LONGFORMER_CLASSES:
        raise LongctxError(f"{name} has no longctx counterpart; convertible: {', '.join(LONGFORMER_CLASSES)}")
    cls, head = LONGFORMER_CLASSES[name]
    hf_cfg = hf_model.config
    base = hf_model if head == "base" else hf_model.longformer
    prefix = "" if head == "base" else "longctx."
    if head == "base" and getattr(base, "pooler", None) is not None:
        log.warning("LongformerModel's pooler (dense + tanh over the first token) has no longctx counterpart "
                    "and is dropped; last hidden states are converted unchanged")
    if head == "mlm" and hf_cfg.hidden_act != "gelu":
        log.warning("Longformer's MLM head always uses gelu, longctx's uses hidden_act=%r: MLM logits will "
                    "differ (hidden states do not)", hf_cfg.hidden_act)
    if head == "qa" and hf_model.qa_outputs.out_features != 2:
        raise LongctxError(f"the QA head has {hf_model.qa_outputs.out_features} outputs; longctx's QA model has 2 "
                           "(start and end logits)")
    if head == "qa" and getattr(hf_cfg, "sep_token_id", None) is None:
        log.warning("the config has no sep_token_id: the QA model needs an explicit global_attention_mask")

    extra = {}
    sd = encoder_state_dict(base, prefix, folded_position_table(base.embeddings))
    if head == "mlm":
        sd.update(lm_head_state_dict(hf_model.lm_head))
        tied = hf_model.lm_head.decoder.weight.data_ptr() == base.embeddings.word_embeddings.weight.data_ptr() or \
            torch.equal(hf_model.lm_head.decoder.weight, base.embeddings.word_embeddings.weight)
        extra["tie_word_embeddings"] = bool(tied)
    elif head == "classification":
        _put(sd, "dense", hf_model.classifier.dense)
        _put(sd, "classifier", hf_model.classifier.out_proj)
    elif head == "qa":
        _put(sd, "qa_outputs", hf_model.qa_outputs)
    cfg = longformer_config(hf_cfg, **extra)
    return build_longctx(cls, cfg, sd, next(hf_model.parameters()).dtype)


def detect_longformer_class(src: Path, hf_cfg) -> str:
    """The Longformer class of a checkpoint: config.architectures, else the weight names."""
    for arch in getattr(hf_cfg, "architectures", None) or []:
        if arch in LONGFORMER_CLASSES:
            return arch
        if arch.startswith("Longformer"):
            raise LongctxError(f"{arch} checkpoints are not supported; convertible: {', '.join(LONGFORMER_CLASSES)}")
    names = weight_names(src)
    if any(n.startswith("lm_head.") for n in names):
        return "LongformerForMaskedLM"
    if any(n.startswith("qa_outputs.") for n in names):
        return "LongformerForQuestionAnswering"
    if any(n.startswith("classifier.out_proj") for n in names):
        return "LongformerForSequenceClassification"
    if names and not any(n.startswith("classifier.") for n in names):
        return "LongformerModel"
    raise LongctxError(f"cannot tell which Longformer class {str(src)!r} holds: config.json has no "
                       "architectures; add e.g. \"architectures\": [\"LongformerForMaskedLM\"]")


def convert_longformer_dir(src: str | os.PathLike, out: str | os.PathLike, force: bool = False,
                           progress: bool = True) -> dict:
    """``longctx convert longformer``: checkpoint directory ``src`` -> longctx directory ``out``
    (weights, config, tokenizer files). Returns a summary."""

    src = Path(src)
    hf_cfg = read_source_config(src, "Hugging Face Longformer")
    if hf_cfg.model_type != "longformer":
        raise LongctxError(f"{str(src)!r} holds a {hf_cfg.model_type!r} model, not a Longformer; for a short "
                           "BERT/RoBERTa use `longctx convert extend`")
    check_has_weights(src)
    prepare_output(out, force)
    arch = detect_longformer_class(src, hf_cfg)
    with Progress(3, "convert longformer", "stages", enabled=progress) as bar:  # load, convert, save
        hf_model = load_hf_model(getattr(transformers, arch), src)
        bar.update(1, stage="loaded")
        model = convert_longformer(hf_model)
        bar.update(1, stage="converted")
        with atomic_output_dir(out, force) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            copied = copy_tokenizer_files(src, tmp)
        bar.update(1, stage="saved")
    return {"source_class": arch, "longctx_class": type(model).__name__, "out": str(out),
            "window": model.config.window, "max_position_embeddings": model.config.max_position_embeddings,
            "tokenizer_files": copied}


# ---------------------------------------------------------------------------------------------------
# output directory
# ---------------------------------------------------------------------------------------------------
def prepare_output(out: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite a non-empty ``out`` without ``force`` (checked before any slow work)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise LongctxError(f"output {str(out)!r} exists and is not a directory; choose another path")
        if any(out.iterdir()) and not force:
            raise LongctxError(f"output directory {str(out)!r} exists and is not empty; choose another path "
                               "or pass --force to replace it")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False):
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` by a rename, on any
    error it is removed and ``out`` is left as it was."""
    out = prepare_output(out, force).absolute()
    with publish_dir(out, prefix=f".{out.name}.tmp-") as tmp:
        yield tmp


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
