"""LongctxConfig: one Hugging Face config for every longctx encoder and decoder.

The attention of each layer is a mechanism from the registry (``longctx.attention.MECHANISMS``), given
as ``attention``:
- a dict ``{"type": "sliding", "window": 128}`` (the same for every layer), or a list of such dicts,
  one per layer (``[{"type": "sliding", "window": 16}, {"type": "full"}]``): the explicit form, which
  is what a saved model holds after staged training;
- a name, the shorthand: ``attention="sliding"`` with the flat keys ``window`` (one int, one per layer,
  or ``window_schedule="grow"`` for Longformer's window that grows with depth), ``dilation`` and
  ``block`` filled in for the mask patterns; other mechanisms by name take their defaults;

A config saved before the per-layer ``attention`` list may hold ``layers`` instead (one dict per layer,
``kind`` for ``type``): it is no field, but ``__init__`` reads it, and only there, turning it into the
explicit ``attention`` list (``_legacy_layers``), so an old saved model loads as it was trained.

``window`` is one-sided (a token sees w keys on each side; Hugging Face Longformer's
``attention_window`` is 2 * window).
"""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from longctx.attention.functional import BACKENDS
from longctx.attention.layer import attention_entry
from longctx.attention.masked import MaskMechanism
from longctx.attention.mechanism import MECHANISMS, LayerContext, build, make_spec
from longctx.attention.patterns import AttentionPattern
from longctx.errors import LongctxError
from longctx.positions import POSITION_KINDS


class LongctxConfig(PretrainedConfig):
    model_type = "longctx"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        norm: str = "post",
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        position: str = "learned",
        max_position_embeddings: int = 4096,
        position_offset: int = 0,
        rope_base: float = 10000.0,
        xpos_scale_base: float = 512.0,
        attention: str | dict | list = "sliding",
        window: int | list[int] = 64,
        window_schedule: str = "constant",
        window_min: int | None = None,
        dilation: int | list = 1,
        block: int = 0,
        causal: bool = False,
        global_projections: bool = True,
        attention_backend: str = "auto",
        attention_seed: int = 0,
        pad_token_id: int = 0,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        sep_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        classifier_dropout: float | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.norm = norm
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.position = position
        self.max_position_embeddings = max_position_embeddings
        self.position_offset = position_offset
        self.rope_base = rope_base
        self.xpos_scale_base = xpos_scale_base
        legacy = kwargs.pop("layers", None)  # an old saved config's per-layer attention (see the module's doc)
        self.attention = attention if legacy is None else _legacy_layers(legacy, num_hidden_layers)
        self.window = window
        self.window_schedule = window_schedule
        self.window_min = window_min
        self.dilation = dilation
        self.block = block
        self.causal = causal
        self.global_projections = global_projections
        self.attention_backend = attention_backend
        self.attention_seed = attention_seed  # seeds the mechanisms' own random draws (BigBird's blocks, ...)
        self.classifier_dropout = classifier_dropout
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         sep_token_id=sep_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.is_decoder = bool(causal)
        self.validate_fields()

    # ------------------------------------------------------------------------------------------------
    def validate_fields(self) -> None:
        """Raise LongctxError naming the first inconsistent field."""
        def need(ok: bool, field: str, msg: str):
            if not ok:
                raise LongctxError(f"config field '{field}': {msg}")

        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings"):
            v = getattr(self, f)
            need(isinstance(v, int) and v > 0, f, f"must be a positive integer, got {v!r}")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
             f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}")
        need(self.norm in ("pre", "post"), "norm", f"must be 'pre' or 'post', got {self.norm!r}")
        need(self.position in POSITION_KINDS, "position", f"must be one of {', '.join(POSITION_KINDS)}, got {self.position!r}")
        need(self.attention_backend in BACKENDS, "attention_backend", f"must be one of {', '.join(BACKENDS)}")
        need(self.window_schedule in ("constant", "grow"), "window_schedule", "must be 'constant' or 'grow'")
        need(0.0 <= self.hidden_dropout_prob < 1.0, "hidden_dropout_prob", "must be in [0, 1)")
        if self.position in ("rope", "xpos"):
            need((self.hidden_size // self.num_attention_heads) % 2 == 0, "position",
                 "rotary positions need an even head size")
        if isinstance(self.window, list):
            need(len(self.window) == self.num_hidden_layers, "window",
                 f"a per-layer list needs {self.num_hidden_layers} values, got {len(self.window)}")
        for i, (name, fields, causal) in enumerate(self.layer_attention()):
            spec = make_spec(name, fields, f"config field 'attention' (layer {i})")
            if isinstance(spec, tuple(_mask_specs())):
                pattern = MECHANISMS[name].make_pattern(spec, causal)
                try:
                    pattern.head_dilations(self.num_attention_heads)
                except LongctxError as e:
                    raise LongctxError(f"config field 'dilation' (layer {i}): {e}") from None

    def layer_attention(self) -> list[tuple[str, dict, bool]]:
        """Every layer's mechanism, bottom to top: (type, fields, causal)."""

        L = self.num_hidden_layers
        att = self.attention
        if isinstance(att, list):
            if len(att) != L:
                raise LongctxError(f"config field 'attention': a per-layer list needs {L} entries, got {len(att)}")
            return [_entry(a, self.causal, f"attention[{i}]") for i, a in enumerate(att)]
        if isinstance(att, dict):
            return [_entry(att, self.causal, "attention")] * L
        if not isinstance(att, str):
            raise LongctxError(f"config field 'attention': give a name, a dict with 'type' or a list, got {att!r}")
        if att not in MECHANISMS:
            raise LongctxError(f"config field 'attention': must be one of {', '.join(sorted(MECHANISMS))}, "
                               f"got {att!r}")
        return [(att, self._shorthand(att, i), self.causal) for i in range(L)]

    def _shorthand(self, name: str, i: int) -> dict:
        """The flat keys (window, window_schedule, dilation, block) as layer i's fields."""
        if name == "sliding":
            dil = self.dilation
            L = self.num_hidden_layers
            per_layer_dil = isinstance(dil, list) and len(dil) == L and all(isinstance(d, list) for d in dil)
            return {"window": self._windows()[i], "dilation": _tuple(dil[i] if per_layer_dil else dil)}
        if name in ("blocks", "blockwise_causal") or (name == "bigbird" and self.block):
            return {"block": self.block}
        return {}

    def _windows(self) -> list:
        L = self.num_hidden_layers
        if isinstance(self.window, list):
            return list(self.window)
        if self.window_schedule == "grow":
            lo = self.window_min if self.window_min is not None else max(1, self.window // 8)
            return [round(lo + (self.window - lo) * i / max(1, L - 1)) for i in range(L)]
        return [self.window] * L

    def layer_context(self, i: int, causal: bool | None = None) -> LayerContext:
        return LayerContext(num_heads=self.num_attention_heads, head_dim=self.hidden_size // self.num_attention_heads,
                            max_len=self.max_position_embeddings, causal=self.causal if causal is None else causal,
                            layer_idx=i, seed=self.attention_seed, backend=self.attention_backend)

    def layer_mechanisms(self) -> list:
        """Every layer's mechanism, built (for descriptions and FLOP counts; the model builds its own)."""
        return [build(name, fields, self.layer_context(i, causal))
                for i, (name, fields, causal) in enumerate(self.layer_attention())]

    def layer_patterns(self) -> list[AttentionPattern | None]:
        """The AttentionPattern of every layer, bottom to top (None for a layer that is not a mask)."""
        return [getattr(m, "pattern", None) for m in self.layer_mechanisms()]

    def describe_attention(self) -> str:
        """A short human description from each mechanism's ``describe()``, e.g. 'sliding w=64 (x4)'."""
        parts = [m.describe() for m in self.layer_mechanisms()]
        uniq = sorted(set(parts), key=parts.index)
        return ", ".join(f"{u} (x{parts.count(u)})" for u in uniq)


def from_run_config(cfg: dict, **fields) -> LongctxConfig:
    """The LongctxConfig of a run config (``longctx.train.config``): its ``model`` section, causal when the
    objective is clm, then ``fields`` on top (the tokenizer's vocabulary and special ids, a task's causality
    and head). Every model built, checked or measured from a run config comes from here; the spellings of
    ``attention`` (a name with the flat window keys, ``{type: NAME, ...}``, one entry per layer) are read
    once, by ``layer_attention``."""
    out = dict(cfg["model"])
    if cfg.get("objective") == "clm":
        out["causal"] = True
    out.update(fields)
    return LongctxConfig(**out)


def _tuple(x):
    return tuple(x) if isinstance(x, list) else x


def _mask_specs():
    return {cls.Spec for cls in MECHANISMS.values() if issubclass(cls, MaskMechanism)}


def _legacy_layers(layers, num_layers: int) -> list[dict]:
    """An old saved config's ``layers`` (one dict per layer, ``kind`` for ``type``, every kind's keys in
    every entry) as the explicit per-layer ``attention`` list; errors name ``layers``."""
    if not (isinstance(layers, list) and len(layers) == num_layers):
        raise LongctxError(f"config field 'layers': needs one entry per layer ({num_layers}), got {layers!r}")
    out = []
    for spec in layers:
        spec = dict(spec)
        if "kind" in spec:
            spec["type"] = spec.pop("kind")
        spec.setdefault("type", "sliding")
        cls = MECHANISMS.get(spec["type"])
        if cls is not None:  # the old form gave every key to every kind: keep the kind's own
            known = {f.name for f in dataclasses.fields(cls.Spec)} | {"type", "causal"}
            spec = {k: v for k, v in spec.items() if k in known or v not in (0, 1, None)}
        out.append(spec)
    entries = [_entry(spec, False, f"layers[{i}]") for i, spec in enumerate(out)]
    for i, (name, fields, _) in enumerate(entries):
        make_spec(name, fields, f"config field 'layers' (layer {i})")
    return out


def _entry(att, causal: bool, where: str) -> tuple[str, dict, bool]:
    """A config entry (a name or {type: NAME, ...}) as (type, fields, causal)."""
    if isinstance(att, dict) and "type" not in att:
        raise LongctxError(f"config field {where}: {att!r} needs a 'type' (one of {', '.join(sorted(MECHANISMS))})")
    try:
        name, fields, own_causal = attention_entry(att)
    except LongctxError as e:
        raise LongctxError(f"config field {where}: {e}") from None
    if "dilation" in fields:
        fields["dilation"] = _tuple(fields["dilation"])
    return name, fields, causal or own_causal
