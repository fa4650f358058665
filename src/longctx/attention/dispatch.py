"""Which attention kernel runs a call, decided in one place, with the reasons for every kernel passed over.

Modelled on xformers' fmha dispatch: each kernel says why it cannot take a call (``Kernel.reasons``, xformers'
``not_supported_reasons``: dtype, device, pattern, a missing or unbuilt extension, tracing, an empty batch, a
backward that a kernel lacks, ...; empty when it can), and each kind of call has ONE priority list per requested
backend (``PRIORITY``): the first kernel with no reason runs. Every caller asks here: ``attention()`` (the mask
family: full, sliding, blocks, blockwise_causal), BigBird's layer (its block-layout kernels) and the layer of
the approximate families (one kernel each), so that the choice, its fallbacks and its explanation cannot drift
apart.

Kernels (``KERNELS``):

- ``dense``:         the reference (an n x n mask): only when asked for, or for a score bias that is not ALiBi;
- ``sdpa``:          PyTorch's scaled_dot_product_attention, the full pattern only;
- ``flex``:          FlexAttention with the pattern's predicate as ``mask_mod`` (where this PyTorch has it;
                     compiled on CUDA, eager and forward-only elsewhere);
- ``fused``:         the fused C++/OpenMP band kernel (``fused.py``): fp32/bf16 CPU tensors, eager;
- ``blocked-torch``: the pure-PyTorch band kernel (``blocked.py``), any dtype and device, traceable;
- ``layout-fused`` / ``layout-torch``: BigBird's block-layout kernel on the fused tiles / in PyTorch steps;
- one kernel per approximate family (linformer, performer, nystrom, lsh).

Requested backends (a layer's ``backend``, a model's ``attention_backend``): ``auto`` (FlexAttention on CUDA,
SDPA for the full pattern, the band policy otherwise), ``blocked`` (the band policy: the fused kernel where it
takes the call, else the PyTorch one), ``fused`` (the extension must load, or one-sentence error; inputs it does
not take still fall back to the PyTorch kernel), ``blocked-torch``, ``sdpa``, ``flex``, ``dense``.

``LONGCTX_FUSED`` is the extension's policy: ``0`` never uses it; ``prebuilt`` uses only an already-built copy
(the test suite's setting, tests/conftest.py), so code that does not ask for it never waits a minute for a
compiler; by default (``auto``/``1``) it is built on first use. ``backend="fused"`` always builds it.

``explain(call)`` is the table ``longctx attention-backends`` prints; with ``LONGCTX_EXPLAIN_ATTENTION=1``
(or ``longctx --explain-attention COMMAND``) every real run logs it once per distinct call shape.
"""
from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch

from longctx.attention import fused
from longctx.attention.mechanism import MECHANISMS
from longctx.errors import LongctxError

log = logging.getLogger(__name__)

REQUESTS = ("auto", "dense", "blocked", "fused", "blocked-torch", "sdpa", "flex")
BAND_KERNELS = ("fused", "blocked-torch")
FUSED_ENV = "LONGCTX_FUSED"
EXPLAIN_ENV = "LONGCTX_EXPLAIN_ATTENTION"
FUSED_DTYPES = fused.DTYPES  # the fused kernels' dtypes (fp16, fp64 run the PyTorch kernels)
MASK_KINDS = ("full", "sliding", "blocks", "blockwise_causal")


class Call(NamedTuple):
    """What the choice depends on (xformers' ``Inputs``), and the call's shape for the log. ``route``: "mask"
    (``attention()``), "layout" (BigBird) or "approx" (an approximate family); ``mechanism``: the registry
    name (or the pattern kind for a direct ``attention()`` call)."""

    route: str
    mechanism: str
    pattern: str
    request: str = "auto"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    grad: bool = False            # a backward will be taken (grad enabled and q requires grad)
    tracing: bool = False         # torch.compile / torch.export is tracing the call
    empty: bool = False           # some input has no elements
    causal: bool = False
    global_tokens: bool = False
    key_padding: bool = False
    alibi: bool = False
    score_bias: bool = False      # a score bias that is not ALiBi (a general callable)
    mixed_dtypes: bool = False    # q, k, v differ in dtype
    batch: int = 1
    heads: int = 1
    length: int = 0
    head_dim: int = 0


def fused_policy() -> str:
    """``LONGCTX_FUSED`` as one of "off", "prebuilt", "auto"."""
    v = os.environ.get(FUSED_ENV, "auto")
    return "off" if v == "0" else "prebuilt" if v == "prebuilt" else "auto"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _extension_unavailable(build: bool | None, dry: bool = False) -> str | None:
    """Why the C++ extension cannot run here, or None. ``build``: compile it if need be (None: as the policy
    says). ``dry`` (the CLI): never build or load, say what a run would find."""
    policy = fused_policy()
    if policy == "off":
        return f"turned off ({FUSED_ENV}=0)"
    build = policy != "prebuilt" if build is None else build
    state = fused._state
    if not dry:
        if fused.load(build=build):
            return None
    elif state["loaded"]:
        return None
    if state["why_not"] is not None:
        return state["why_not"]
    if dry:
        why = fused.compiler_missing()
        if why is not None:
            return why
        if build or fused.is_built():
            return None
    return f"not built yet ({FUSED_ENV}=prebuilt: only an already-built copy is used; backend 'fused' builds it)"


class Kernel:
    """One kernel: its name, what it is, the routes it serves, and why it cannot take a call."""

    name = ""
    summary = ""
    routes: tuple[str, ...] = ()
    hint = ""  # what to ask for instead, when an explicit request cannot run

    def reasons(self, call: Call, dry: bool = False) -> list[str]:
        """Why this kernel cannot take ``call`` (empty: it can). ``dry``: for the explanation only (nothing
        is built or loaded)."""
        return []

    def note(self, call: Call) -> str:
        """A remark on the chosen kernel (the CLI's table)."""
        return ""


class Dense(Kernel):
    name, routes = "dense", ("mask", "layout")
    summary = "the dense reference (an n x n mask): for tests, tiny inputs and general score biases"


class SDPA(Kernel):
    name, routes, hint = "sdpa", ("mask", "layout"), "use backend 'blocked'"
    summary = "PyTorch's scaled_dot_product_attention"

    def reasons(self, call, dry=False):
        if call.pattern != "full":
            return [f"runs the full pattern only, not {call.pattern!r}"]
        return []


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401  (only whether it imports)
        return True
    except ImportError:
        return False


class Flex(Kernel):
    name, routes, hint = "flex", ("mask", "layout"), "use backend 'blocked' for training"
    summary = "FlexAttention, the pattern's predicate as mask_mod (compiled on CUDA)"

    def reasons(self, call, dry=False):
        out = []
        if not flex_available():
            out.append("FlexAttention is not in this PyTorch (torch.nn.attention.flex_attention)")
        if call.device != "cuda" and call.grad:
            out.append("FlexAttention has no CPU backward in this PyTorch (this call needs one)")
        return out


def _fused_input_reasons(call: Call) -> list[str]:
    out = []
    if call.device != "cpu":
        out.append(f"device {call.device} (CPU only)")
    if call.dtype not in FUSED_DTYPES or call.mixed_dtypes:
        got = "q, k, v of different dtypes" if call.mixed_dtypes else f"dtype {_dtype_name(call.dtype)}"
        out.append(f"{got} (takes {', '.join(_dtype_name(d) for d in FUSED_DTYPES)})")
    if call.tracing:
        out.append("traced (torch.compile / torch.export): a graph runs the PyTorch kernel")
    if call.empty:
        out.append("empty input (the C++ side splits its work by batch and head)")
    return out


class Fused(Kernel):
    name, routes, hint = "fused", ("mask",), "use backend 'blocked'"
    summary = "the fused C++ band kernel (csrc/band_attention.cpp)"

    def reasons(self, call, dry=False):
        out = _fused_input_reasons(call)
        if call.pattern not in MASK_KINDS:
            out.append(f"runs band patterns, not {call.pattern!r}")
        # the extension is probed (loaded, or built under the policy) only for a call it could take
        if not out or dry:
            why = _extension_unavailable(True if call.request == "fused" else None, dry=dry)
            if why is not None:
                out.append(f"extension unavailable: {why}")
        return out

    def note(self, call):
        if not fused._state["loaded"] and not fused.is_built():
            return "not built yet: compiled on first use (about a minute), then cached"
        return ""


class BlockedTorch(Kernel):
    name, routes = "blocked-torch", ("mask",)
    summary = "the pure-PyTorch band kernel (blocked.py; traceable)"

    def reasons(self, call, dry=False):
        if call.pattern not in MASK_KINDS:
            return [f"runs band patterns, not {call.pattern!r}"]
        return []


class LayoutFused(Fused):
    name, routes = "layout-fused", ("layout",)
    summary = "BigBird's block-layout kernel on the fused C++ tiles"

    def reasons(self, call, dry=False):
        out = _fused_input_reasons(call)
        if not out or dry:
            why = _extension_unavailable(True if call.request == "fused" else None, dry=dry)
            if why is not None:
                out.append(f"extension unavailable: {why}")
        return out


class LayoutTorch(Kernel):
    name, routes = "layout-torch", ("layout",)
    summary = "BigBird's block-layout kernel in PyTorch steps (bigbird.py)"


class Approximate(Kernel):
    """The one kernel of an approximate family (its own PyTorch code)."""

    routes = ("approx",)
    hint = ""

    def __init__(self, family: str):
        self.name, self.summary = family, f"{family}'s own PyTorch kernel (the family's only kernel)"


KERNELS: dict[str, Kernel] = {k.name: k for k in (Dense(), SDPA(), Flex(), Fused(), BlockedTorch(), LayoutFused(),
                                                   LayoutTorch())}

# THE priority lists: route -> requested backend -> kernels, first that takes the call runs
PRIORITY: dict[str, dict[str, tuple[str, ...]]] = {
    "mask": {
        "auto": ("flex", "sdpa", "fused", "blocked-torch"),  # flex on CUDA only (``_policy_reasons``)
        "blocked": ("fused", "blocked-torch"),
        "fused": ("fused", "blocked-torch"),  # the extension must load; inputs it does not take fall back
        "blocked-torch": ("blocked-torch",),
        "sdpa": ("sdpa",),
        "flex": ("flex",),
        "dense": ("dense",),
    },
    "layout": {
        "auto": ("flex", "layout-fused", "layout-torch"),  # flex on CUDA only
        "blocked": ("layout-fused", "layout-torch"),
        "sdpa": ("layout-fused", "layout-torch"),  # SDPA cannot run a block layout: the layout policy
        "fused": ("layout-fused", "layout-torch"),  # the extension must load
        "blocked-torch": ("layout-torch",),
        "flex": ("flex",),
        "dense": ("dense",),
    },
}


def route_of(mechanism: str) -> str:
    """"mask", "layout" or "approx" for a registered mechanism (or a pattern kind)."""

    cls = MECHANISMS.get(mechanism)
    return getattr(cls, "kernel_route", "mask" if mechanism in MASK_KINDS else "approx")


def priority(call: Call) -> tuple[str, ...]:
    """The kernels tried for ``call``, in order."""
    if call.route == "approx":
        return (call.mechanism,)
    if call.score_bias:  # only the reference takes a general bias callable, whatever was asked for
        return ("dense",)
    return PRIORITY[call.route][call.request]


def kernel(name: str) -> Kernel:
    return KERNELS[name] if name in KERNELS else Approximate(name)


def _policy_reasons(call: Call, name: str) -> list[str]:
    """Why the request's policy passes over a kernel that could run (not a limit of the kernel)."""
    if name == "flex" and call.request == "auto" and call.device != "cuda":
        return ["'auto' takes FlexAttention on CUDA only (off CUDA it runs eagerly, materialising the scores)"]
    return []


def mechanism_reasons(call: Call) -> list[str]:
    """Why the mechanism itself (any kernel of it) cannot take the call: what its layer would refuse."""

    cls = MECHANISMS.get(call.mechanism)
    if cls is None:
        return []
    sup, out = cls.supports, []
    if call.causal and not sup.causal:
        out.append(f"{call.mechanism!r} has no causal form")
    if call.global_tokens and not sup.global_tokens:
        out.append(f"{call.mechanism!r} has no global tokens")
    if (call.alibi or call.score_bias) and not sup.score_bias:
        out.append(f"{call.mechanism!r} takes no score bias (ALiBi)")
    return out


class Choice(NamedTuple):
    kernel: str | None
    rejected: tuple[tuple[str, tuple[str, ...]], ...]  # (kernel, reasons) tried before it, in order


def decide(call: Call) -> Choice:
    """The first kernel of ``call``'s priority list with no reason against it (kernel None: none)."""
    if call.request not in REQUESTS:
        raise LongctxError(f"attention backend {call.request!r} is unknown; use one of {', '.join(REQUESTS)}")
    if call.route == "approx":
        return Choice(call.mechanism, ())
    if call.request == "fused" and not call.score_bias:
        fused.require()  # backend "fused": build, or raise one sentence
    rejected = []
    for name in priority(call):
        why = _policy_reasons(call, name) + kernel(name).reasons(call)
        if not why:
            return Choice(name, tuple(rejected))
        rejected.append((name, tuple(why)))
    return Choice(None, tuple(rejected))


_seen: set[Call] = set()
_warned: set[str] = set()
last: dict[str, Choice] = {}  # route -> the last eager choice (tests, debugging)


def choose(call: Call) -> str:
    """The kernel that runs ``call``; a LongctxError where an explicit request cannot run it. Eagerly (not
    while tracing) the choice is recorded in ``last`` and, with LONGCTX_EXPLAIN_ATTENTION=1, logged once per
    distinct call."""
    choice = decide(call)
    if choice.kernel is None:
        name, why = choice.rejected[0]
        hint = kernel(name).hint
        raise LongctxError(f"backend {call.request!r} cannot run this call: {'; '.join(why)}" + (f"; {hint}" if hint else ""))
    if not torch.compiler.is_compiling():
        last[call.route] = choice
        if (call.route != "approx" and call.request == "auto" and call.device == "cuda" and choice.kernel != "flex"
                and not flex_available()):
            _warn_once("FlexAttention is not available in this PyTorch: CUDA inputs use the blocked kernel")
        if os.environ.get(EXPLAIN_ENV, "") not in ("", "0") and call not in _seen:
            _seen.add(call)
            log.warning("%s", explain(call, choice.kernel, dry=False))
    return choice.kernel


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def prepare_fused() -> bool:
    """Load the extension (building it under the policy), before a clock starts: True where it is ready."""
    return _extension_unavailable(None) is None


_tried_load = {"done": False}


def extension_ready() -> bool:
    """For the extension's other kernels (``longctx.dropout``, ``longctx.loss``), asked per call: it is loaded
    (one try per process under the policy, then only the loaded flag is read) and not turned off."""
    if fused_policy() == "off":
        return False
    if fused._state["loaded"]:
        return True
    if not _tried_load["done"]:
        _tried_load["done"] = True
        return prepare_fused()
    return False


def fused_builds_on_demand() -> bool:
    """Whether code that does not ask for the extension may compile it (``LONGCTX_FUSED`` is not prebuilt)."""
    return fused_policy() != "prebuilt"


# -- the calls ------------------------------------------------------------------------------------------------
def _grad(q: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and q.requires_grad


def mask_call(request: str, q, pattern, *, key_padding_mask=None, global_mask=None, alibi_slopes=None,
              score_bias=None, mechanism: str | None = None) -> Call:
    """The call ``attention(q, k, v, pattern, ...)`` makes (q (B, H, n, d))."""
    B, H, n, d = q.shape
    return Call("mask", mechanism or pattern.kind, pattern.kind, request, q.device.type, q.dtype, _grad(q),
                torch.compiler.is_compiling(), q.numel() == 0, bool(pattern.causal), global_mask is not None,
                key_padding_mask is not None, alibi_slopes is not None, score_bias is not None, False, B, H, n, d)


def layout_call(request: str, q, k, v, *, key_padding_mask=None, global_mask=None) -> Call:
    """BigBird's call: q, k, v (B, H, n, d)."""
    B, H, n, d = q.shape
    return Call("layout", "bigbird", "bigbird", request, q.device.type, q.dtype, _grad(q),
                torch.compiler.is_compiling(), q.numel() == 0, False, global_mask is not None,
                key_padding_mask is not None, False, False, not (k.dtype == v.dtype == q.dtype), B, H, n, d)


def approx_call(mechanism, q, *, causal: bool = False, key_padding=None, global_mask=None, bias=None) -> Call:
    """An approximate family's call (its one kernel)."""
    B, H, n, d = q.shape
    return Call("approx", mechanism.name, mechanism.name, mechanism.ctx.backend, q.device.type, q.dtype, _grad(q),
                torch.compiler.is_compiling(), q.numel() == 0, causal, global_mask is not None,
                key_padding is not None, bias is not None, False, False, B, H, n, d)


# -- the explanation ------------------------------------------------------------------------------------------
def describe_call(call: Call, title: str | None = None) -> str:
    extras = [x for x, on in (("causal", call.causal), ("key padding", call.key_padding),
                              ("global tokens", call.global_tokens), ("ALiBi", call.alibi),
                              ("a general score bias", call.score_bias), ("backward", call.grad),
                              ("traced", call.tracing)) if on]
    shape = f"batch {call.batch} x {call.heads} heads x {call.length} tokens x head dim {call.head_dim}"
    return (f"{title or call.mechanism} attention, {shape}, {_dtype_name(call.dtype)} on {call.device}"
            + (f", {', '.join(extras)}" if extras else "") + f"; backend {call.request!r}")


def dry_choice(call: Call) -> tuple[str | None, str | None]:
    """(the kernel a run would choose now, or None; the error it would raise, or None), found without
    building, loading or raising: ``decide`` for the CLI."""
    mech = mechanism_reasons(call)
    if mech:
        return None, "no kernel takes this call: " + "; ".join(mech)
    if call.request not in REQUESTS:
        return None, f"attention backend {call.request!r} is unknown; use one of {', '.join(REQUESTS)}"
    if call.route == "approx":
        return call.mechanism, None
    if call.request == "fused" and not call.score_bias:
        why = _extension_unavailable(True, dry=True)
        if why is not None:
            return None, f"backend 'fused' is unavailable: {why}"
    first = None
    for name in priority(call):
        why = _policy_reasons(call, name) + kernel(name).reasons(call, dry=True)
        if not why:
            return name, None
        first = first or (name, why)
    hint = kernel(first[0]).hint
    return None, f"backend {call.request!r} cannot run this call: {'; '.join(first[1])}" + (f"; {hint}" if hint else "")


def rows(call: Call, chosen: str | None = None, dry: bool = True) -> tuple[str | None, list[tuple[str, str, list[str]]]]:
    """(chosen kernel or None, [(kernel, status, reasons)] for every kernel of the call's route): status is
    "runs", "cannot" (its reasons), "passed over" (the policy's reason) or "lower priority". Reasons are
    found without building or loading anything; ``dry`` (the CLI): the choice too, else ``chosen`` is the
    choice the run made."""
    route_names = [call.mechanism] if call.route == "approx" else [n for n, k in KERNELS.items() if call.route in k.routes]
    mech = mechanism_reasons(call)
    order = priority(call)
    if dry:
        chosen = dry_choice(call)[0]
    out = []
    for name in sorted(route_names, key=lambda x: (order.index(x) if x in order else len(order), x)):
        k = kernel(name)
        why = mech or k.reasons(call, dry=True)
        if name == chosen:
            out.append((name, "runs", [x for x in [k.note(call)] if x]))
        elif why:
            out.append((name, "cannot", why))
        elif name in order and _policy_reasons(call, name):
            out.append((name, "passed over", _policy_reasons(call, name)))
        elif name in order and chosen is not None and order.index(name) > order.index(chosen):
            out.append((name, "lower priority", [f"{chosen!r} comes first for backend {call.request!r}"]))
        elif name == "dense":
            out.append((name, "passed over", ["runs only when asked for (backend 'dense') or for a score bias "
                                              "that is not ALiBi"]))
        else:
            out.append((name, "passed over", [f"not in the list for backend {call.request!r} ({', '.join(order)})"]))
    return chosen, out


def explain(call: Call, chosen: str | None = None, dry: bool = True, title: str | None = None) -> str:
    """The choice for ``call`` with every kernel's reasons, as text (``dry``: the choice found here without
    building anything, as a run would make it; else ``chosen``, the choice a run made). ``title``: the
    mechanism as its ``describe()`` says it."""
    chosen, table = rows(call, chosen, dry)
    lines = [f"attention call: {describe_call(call, title)}"]
    if call.route == "approx":
        lines.append(f"  {call.mechanism} has a single kernel (approximate family): no choice to make")
    if chosen is None and dry:
        lines.append(f"  {dry_choice(call)[1]}")
    width = max(len(n) for n, _, _ in table)
    for name, status, why in table:
        mark = "->" if status == "runs" else "  "
        text = f"{status}: {'; '.join(why)}" if why else status
        lines.append(f"  {mark} {name:<{width}}  {text}")
    if chosen is not None:
        lines.append(f"  ({chosen}: {kernel(chosen).summary})")
    return "\n".join(lines)
