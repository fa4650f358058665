"""`longctx attention-backends`: which attention kernel runs a call, and why every other kernel does not.

The call is described by flags (``--attention sliding --window 256 --length 4096 --dtype bf16 --heads 8
--head-dim 64 --global-tokens 1 --causal``) or read from an experiment config (``--config F``: every
distinct layer of its model, at its sequence length). The answer is the dispatcher's
(``longctx/attention/dispatch.py``), found without building or loading anything: what a run would choose
now, under this process's ``LONGCTX_FUSED``. The parser imports no torch; the command does.
"""
from __future__ import annotations

from longctx.errors import LongctxError

# Imports of torch, transformers and of modules that import them stay inside the functions that use them:
# the CLI parser imports this module (`longctx --help` stays fast: tests/test_newcomer.py).

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16", "half": "float16", "fp64": "float64", "float64": "float64"}
DEVICES = ("cpu", "cuda")


def register(sub) -> None:
    p = sub.add_parser("attention-backends", help="which attention kernel runs a call, and why the others do not",
                       description="Print the kernel the dispatcher picks for one attention call and, for every "
                                   "other kernel, why it does not run it (longctx --explain-attention COMMAND, "
                                   "or LONGCTX_EXPLAIN_ATTENTION=1, logs the same for every call of a real run).")
    p.add_argument("--attention", metavar="NAME", help="the mechanism: full, sliding, blocks, blockwise_causal, "
                                                       "bigbird, linformer, performer, nystrom, lsh (default sliding)")
    p.add_argument("--window", metavar="W", help="sliding: one-sided window")
    p.add_argument("--block", metavar="B", help="blocks, blockwise_causal, bigbird: block size")
    p.add_argument("--length", metavar="N", help="tokens per sequence (default 4096)")
    p.add_argument("--batch", metavar="B", help="sequences per batch (default 1)")
    p.add_argument("--heads", metavar="H", help="attention heads (default 8)")
    p.add_argument("--head-dim", metavar="D", help="head dimension (default 64)")
    p.add_argument("--dtype", metavar="T", help="fp32, bf16, fp16 or fp64 (default fp32)")
    p.add_argument("--device", metavar="DEV", help="cpu or cuda (default cpu)")
    p.add_argument("--backend", metavar="B", help="requested backend: auto, blocked, fused, blocked-torch, sdpa, "
                                                  "flex, dense (default auto)")
    p.add_argument("--global-tokens", metavar="G", help="global tokens per sequence (default 0)")
    p.add_argument("--causal", action="store_true", help="a causal (decoder) call")
    p.add_argument("--padding", action="store_true", help="with a key padding mask")
    p.add_argument("--alibi", action="store_true", help="with an ALiBi score bias")
    p.add_argument("--grad", action="store_true", help="a training call (a backward will be taken)")
    p.add_argument("--config", metavar="F", help="an experiment config (YAML): explain every distinct layer of its "
                                                 "model at data.seq_len (the flags above are then ignored)")
    p.set_defaults(func=run)


def _int(args, flag: str, default: int, lo: int = 1) -> int:
    raw = getattr(args, flag.lstrip("-").replace("-", "_"))
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        v = None
    if v is None or v < lo:
        raise LongctxError(f"{flag} must be an integer >= {lo}, got {raw!r}")
    return v


def _choice(args, flag: str, options, default: str) -> str:
    raw = getattr(args, flag.lstrip("-").replace("-", "_"))
    if raw is None:
        return default
    if raw not in options:
        raise LongctxError(f"{flag} must be one of {', '.join(dict.fromkeys(options))}, got {raw!r}")
    return raw


def calls_from_flags(args) -> list:
    """[(the call the flags describe, the mechanism's description)]."""
    import torch

    import longctx.attention  # noqa: F401  (registers the mechanisms)
    from longctx.attention import dispatch
    from longctx.attention.mechanism import MECHANISMS, LayerContext, build, make_spec

    name = args.attention or "sliding"
    fields = {}
    if args.window is not None:
        fields["window"] = _int(args, "--window", 0, lo=0)
    if args.block is not None:
        fields["block"] = _int(args, "--block", 0)
    n, B = _int(args, "--length", 4096), _int(args, "--batch", 1)
    H, d = _int(args, "--heads", 8), _int(args, "--head-dim", 64)
    G = _int(args, "--global-tokens", 0, lo=0)
    dtype = getattr(torch, DTYPES[_choice(args, "--dtype", DTYPES, "fp32")])
    device = _choice(args, "--device", DEVICES, "cpu")
    request = _choice(args, "--backend", dispatch.REQUESTS, "auto")
    if G > n:
        raise LongctxError(f"--global-tokens {G} is more than the {n} tokens of --length")
    spec = make_spec(name, fields, where="--attention")
    cls = MECHANISMS[name]
    causal = args.causal
    route = cls.kernel_route
    pattern = name
    if route == "mask":
        pattern_obj = cls.make_pattern(spec, causal)
        pattern, causal = pattern_obj.kind, bool(pattern_obj.causal)
    title = name
    if not dispatch.mechanism_reasons(dispatch.Call(route, name, pattern, causal=causal)):
        title = build(name, fields, LayerContext(num_heads=H, head_dim=d, max_len=n, causal=causal)).describe()
    return [(dispatch.Call(route, name, pattern, request, device, dtype, args.grad, False, B == 0, causal, G > 0,
                           args.padding, args.alibi, False, False, B, H, n, d), title)]


def calls_from_config(path: str) -> list:
    """[(call, description)]: one call per distinct layer of the config's model: a training call at data.seq_len (bf16 under
    train.bf16's autocast), batch train.batch_size."""
    import torch

    from longctx.attention import dispatch
    from longctx.models.config import from_run_config
    from longctx.positions import in_attention
    from longctx.train.config import load_yaml, resolve

    cfg = resolve(load_yaml(path))
    config = from_run_config(cfg)
    H = config.num_attention_heads
    d = config.hidden_size // H
    dtype = torch.bfloat16 if cfg["train"].get("bf16") else torch.float32
    n, B = cfg["data"]["seq_len"], cfg["train"]["batch_size"]
    bias = in_attention(config.position, H, d).bias
    calls = []
    for mech in config.layer_mechanisms():
        route, name = mech.kernel_route, mech.name
        pattern = getattr(mech, "pattern", None)
        kind = pattern.kind if route == "mask" else name
        causal = bool(pattern.causal) if route == "mask" else mech.ctx.causal
        alibi = bias is not None and getattr(bias, "slopes", None) is not None
        call = dispatch.Call(route, name, kind, config.attention_backend, "cpu", dtype, True, False, False, causal,
                             False, True, alibi, bias is not None and not alibi, False, B, H, n, d)
        if call not in [c for c, _ in calls]:
            calls.append((call, mech.describe()))
    return calls


def run(args) -> int:
    from longctx.attention import dispatch

    calls = calls_from_config(args.config) if args.config else calls_from_flags(args)
    errors = []
    for i, (call, title) in enumerate(calls):
        if i:
            print()
        print(dispatch.explain(call, title=title))
        chosen, error = dispatch.dry_choice(call)
        if chosen is None:
            errors.append(error)
    if errors:  # what the run would raise
        raise LongctxError(errors[0])
    return 0
