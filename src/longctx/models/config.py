"""LongctxConfig: one Hugging Face config for every longctx encoder and decoder.

The attention of each layer is given either by shorthand (the same kind for all layers, with
``window`` as one int, one int per layer, or ``window_schedule="grow"`` for Longformer's window that
grows with depth) or explicitly with ``layers``: one dict per layer, e.g.
``{"kind": "sliding", "window": 64, "dilation": [1, 1, 2, 2]}``.

``window`` is one-sided (a token sees w keys on each side; Hugging Face Longformer's
``attention_window`` is 2 * window).
"""
from __future__ import annotations

from transformers import PretrainedConfig

from longctx.attention.functional import BACKENDS
from longctx.attention.patterns import KINDS, AttentionPattern
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
        attention: str = "sliding",
        window: int | list[int] = 64,
        window_schedule: str = "constant",
        window_min: int | None = None,
        dilation: int | list = 1,
        block: int = 0,
        causal: bool = False,
        global_projections: bool = True,
        attention_backend: str = "auto",
        layers: list[dict] | None = None,
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
        self.attention = attention
        self.window = window
        self.window_schedule = window_schedule
        self.window_min = window_min
        self.dilation = dilation
        self.block = block
        self.causal = causal
        self.global_projections = global_projections
        self.attention_backend = attention_backend
        self.layers = layers
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
        need(self.attention in KINDS, "attention", f"must be one of {', '.join(KINDS)}, got {self.attention!r}")
        need(self.attention_backend in BACKENDS, "attention_backend", f"must be one of {', '.join(BACKENDS)}")
        need(self.window_schedule in ("constant", "grow"), "window_schedule", "must be 'constant' or 'grow'")
        need(0.0 <= self.hidden_dropout_prob < 1.0, "hidden_dropout_prob", "must be in [0, 1)")
        if self.position in ("rope", "xpos"):
            need((self.hidden_size // self.num_attention_heads) % 2 == 0, "position",
                 "rotary positions need an even head size")
        if self.layers is not None:
            need(isinstance(self.layers, list) and len(self.layers) == self.num_hidden_layers, "layers",
                 f"needs one entry per layer ({self.num_hidden_layers}), got {self.layers!r}")
        if isinstance(self.window, list):
            need(len(self.window) == self.num_hidden_layers, "window",
                 f"a per-layer list needs {self.num_hidden_layers} values, got {len(self.window)}")
        patterns = self.layer_patterns()
        for i, p in enumerate(patterns):
            try:
                p.head_dilations(self.num_attention_heads)
            except LongctxError as e:
                raise LongctxError(f"config field 'dilation' (layer {i}): {e}") from None

    def layer_patterns(self) -> list[AttentionPattern]:
        """The AttentionPattern of every layer, bottom to top."""
        L = self.num_hidden_layers
        if self.layers is not None:
            out = []
            for i, spec in enumerate(self.layers):
                spec = dict(spec)
                unknown = set(spec) - {"kind", "window", "dilation", "block", "causal"}
                if unknown:
                    raise LongctxError(f"config field 'layers' (layer {i}): unknown keys {sorted(unknown)}")
                spec.setdefault("causal", self.causal)
                out.append(_pattern(spec, f"layers[{i}]"))
            return out
        if isinstance(self.window, list):
            windows = list(self.window)
        elif self.window_schedule == "grow":
            lo = self.window_min if self.window_min is not None else max(1, self.window // 8)
            windows = [round(lo + (self.window - lo) * i / max(1, L - 1)) for i in range(L)]
        else:
            windows = [self.window] * L
        dil = self.dilation
        per_layer_dil = isinstance(dil, list) and len(dil) == L and all(isinstance(d, list) for d in dil)
        return [_pattern(dict(kind=self.attention, window=windows[i], block=self.block, causal=self.causal,
                              dilation=dil[i] if per_layer_dil else dil), f"layer {i}")
                for i in range(L)]

    def describe_attention(self) -> str:
        """A short human description, e.g. 'sliding w=64 (x4)'."""
        parts = []
        for p in self.layer_patterns():
            s = p.kind + (f" w={p.window}" if p.kind == "sliding" else "") + (f" b={p.block}" if p.block else "")
            if p.dilation not in (1, (1,)):
                s += f" d={p.dilation}"
            parts.append(s)
        uniq = sorted(set(parts), key=parts.index)
        return ", ".join(f"{u} (x{parts.count(u)})" for u in uniq)


def _pattern(spec: dict, where: str) -> AttentionPattern:
    try:
        dil = spec.get("dilation", 1)
        return AttentionPattern(kind=spec.get("kind", "sliding"), window=int(spec.get("window", 0) or 0),
                                dilation=tuple(dil) if isinstance(dil, list) else dil,
                                block=int(spec.get("block", 0) or 0), causal=bool(spec.get("causal", False)))
    except LongctxError as e:
        raise LongctxError(f"config attention ({where}): {e}") from None
