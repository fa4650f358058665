"""Attention mechanisms: the contract every attention family implements, and the registry.

A mechanism is one file: a ``Spec`` dataclass (its config keys; an unknown key is a one-sentence
error), capability flags, ``forward`` (the fast path), ``reference`` (the readable oracle the tests
hold ``forward`` to), ``flops`` (useful work), ``describe`` and, where it is defined, the effective
attention matrix ``attention_map`` (what ``longctx analyze`` reads), and ``examples``: the settings it is
tested and benchmarked with. One ``@register`` line makes it selectable everywhere: model configs
(``attention: {type: NAME, ...}``), ``longctx compare`` variants, the report, ``longctx bench attention
--impl longctx-NAME`` (with its ``bench`` example) and the tests, with no table to edit:
tests/test_mechanism_contract.py holds every registered mechanism to this contract (forward equals
reference on outputs and gradients, ``attention_map @ v`` equals forward, ``flops`` and ``describe``,
unknown keys refused, seeded builds identical) on its ``test`` example, and tests/test_analysis.py runs
the model-level attention-map test on every mechanism with an ``attention_map``.

Shapes: q, k, v are (B, H, n, d), already projected and, for rotary positions, rotated; the mechanism
applies the 1/sqrt(d) scale itself. ``key_padding`` and ``global_mask`` are (B, n) bool (True = real
token / global token). ``bias`` is an optional additive score bias (ALiBi), given as a callable
``bias(q_pos, k_pos) -> (H, tq, tk)`` on integer positions, for mechanisms with ``score_bias``.
Mechanisms own their parameters (Linformer's E and F) and their random draws (Performer's features,
BigBird's random blocks, LSH rotations), seeded from ``seed`` so that two builds with the same
config are identical, and deterministic in evaluation mode.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from longctx.errors import LongctxError


@dataclass(frozen=True)
class Capabilities:
    causal: bool = False         # can run causally (a decoder)
    global_tokens: bool = False  # honours global_mask (Longformer's global attention)
    cache: bool = False          # has a key-value cache rule for generation
    score_bias: bool = False     # takes an additive score bias (ALiBi)
    global_projections: bool = False  # takes Longformer's separate global q, k, v (``global_qkv=``)


@dataclass(frozen=True)
class LayerContext:
    """What a mechanism may need to know about the layer it sits in."""

    num_heads: int
    head_dim: int
    max_len: int          # the longest sequence the model is built for (max_position_embeddings)
    causal: bool = False
    layer_idx: int = 0
    seed: int = 0         # base seed for the mechanism's own random draws
    backend: str = "auto"  # kernel choice for mechanisms that have several (the mask family)


@dataclass
class LayerCache:
    """Keys and values of past positions for one layer (generation), trimmed by the mechanism's cache
    rule to what later queries can still reach."""

    k: torch.Tensor | None = None  # (B, H, m, d), positions already applied
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # (m,)

    def __len__(self) -> int:
        return 0 if self.pos is None else self.pos.numel()

    def extend(self, k, v, pos, keep_from: int) -> None:
        if self.k is not None:
            k, v, pos = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2), torch.cat([self.pos, pos])
        keep = int(torch.searchsorted(pos, torch.tensor(keep_from, device=pos.device)))
        self.k, self.v, self.pos = k[:, :, keep:], v[:, :, keep:], pos[keep:]


class Mechanism(nn.Module):
    """Base class. Subclasses set ``name``, ``Spec`` and ``supports`` and implement ``forward``,
    ``reference``, ``flops`` and ``describe``; ``examples`` where the Spec defaults do not suit."""

    name: ClassVar[str] = ""
    Spec: ClassVar[type] = object
    supports: ClassVar[Capabilities] = Capabilities()
    # which kernels can run it (dispatch.py): "mask" (attention()'s), "layout" (BigBird's), "approx" (its own, one)
    kernel_route: ClassVar[str] = "approx"
    # config keys to run the mechanism with, by purpose; a purpose not given runs on the Spec defaults.
    # "test": small, for the contract and analysis tests (2 heads of dimension 8, up to 64 tokens, fp32
    # and fp64); "bench": ``longctx bench attention --impl longctx-NAME`` (hidden 768, 12 heads, 1k-64k tokens)
    examples: ClassVar[dict[str, dict]] = {}

    @classmethod
    def example(cls, purpose: str) -> dict:
        """The config keys for ``purpose`` ("test" or "bench"): ``examples[purpose]``, else {} (the Spec
        defaults)."""
        if purpose not in ("test", "bench"):
            raise ValueError(f"example purpose must be 'test' or 'bench', got {purpose!r}")
        return copy.deepcopy(cls.examples.get(purpose, {}))

    def __init__(self, spec: Any, ctx: LayerContext):
        super().__init__()
        self.spec, self.ctx = spec, ctx
        if ctx.causal and not self.supports.causal:
            raise LongctxError(f"attention {self.name!r} has no causal form; use it in an encoder")

    def forward(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None, cache=None):
        raise NotImplementedError

    def reference(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        """The readable oracle: same function as ``forward``, written for clarity, not speed."""
        raise NotImplementedError

    def attention_map(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        """The effective (B, H, n, n) attention matrix A with ``A @ v == forward(...)``, where defined."""
        raise LongctxError(f"attention {self.name!r} has no attention matrix to show")

    def flops(self, n: int, num_global: int = 0) -> float:
        """Forward FLOPs of the attention core for one sequence of n tokens, all heads (useful work,
        global rows and columns counted)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def mask(self, n: int, key_padding=None, global_mask=None, device=None):
        """The (B or 1, H, n, n) boolean mask of allowed pairs where the mechanism is a mask, else None
        (what ``SelfAttention.scores`` puts onto the raw scores)."""
        return None


MECHANISMS: dict[str, type[Mechanism]] = {}


def register(cls: type[Mechanism]) -> type[Mechanism]:
    """Class decorator: make a mechanism selectable by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    MECHANISMS[cls.name] = cls
    return cls


def make_spec(name: str, fields: dict, where: str = "attention"):
    """The mechanism's Spec from a dict of config keys; unknown keys and bad values are one sentence."""
    if name not in MECHANISMS:
        raise LongctxError(f"{where}: attention type {name!r} is unknown; use one of {', '.join(sorted(MECHANISMS))}")
    spec_cls = MECHANISMS[name].Spec
    known = {f.name for f in dataclasses.fields(spec_cls)}
    unknown = set(fields) - known
    if unknown:
        raise LongctxError(f"{where}: attention {name!r} has no keys {sorted(unknown)}; "
                           f"its keys are {', '.join(sorted(known)) or '(none)'}")
    try:
        return spec_cls(**fields)
    except (TypeError, ValueError) as e:
        raise LongctxError(f"{where}: attention {name!r}: {e}") from None


def build(name: str, fields: dict, ctx: LayerContext, where: str = "attention") -> Mechanism:
    return MECHANISMS[name](make_spec(name, fields, where), ctx) if name in MECHANISMS else make_spec(name, fields, where)
