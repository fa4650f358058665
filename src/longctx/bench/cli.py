"""`longctx bench attention|train|hf`: speed and memory against the peers, written as JSON, Markdown and PNG.

Configurations live in benchmarks/*.yaml; any setting can also be given on the command line
(``--lengths 1024 4096``, ``--impl longctx-sliding hf-longformer``, ``--repeats 5``). Results go to
``runs/bench-<name>/`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import shlex
from pathlib import Path

from longctx.errors import LongctxError

# Imports of torch, transformers and of modules that import them stay inside the functions that use them:
# the CLI parser imports this module (`longctx --help` stays fast: tests/test_newcomer.py).


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="speed and memory benchmarks against the peers",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="bench_kind", metavar="BENCHMARK")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    a = sub.add_parser("attention", help="one self-attention layer: longctx kernels vs SDPA, HF Longformer, "
                                         "local-attention", description="Time and peak memory of one "
                                         "self-attention layer per implementation and length.")
    _common(a)
    a.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 1024 .. 65536)")
    a.add_argument("--impl", nargs="+", dest="implementations", help="implementations to run")
    a.add_argument("--dtypes", nargs="+", help="float32 and/or bfloat16")
    a.add_argument("--attention-window", type=int, help="two-sided window, as Hugging Face's attention_window "
                                                        "(longctx's one-sided window is half of it)")
    a.add_argument("--window", type=int, help=argparse.SUPPRESS)  # the old spelling: refused with a hint
    a.add_argument("--hidden", type=int)
    a.add_argument("--heads", type=int)
    a.set_defaults(func=functools.partial(_run, "attention"))

    t = sub.add_parser("train", help="masked-LM training step: longctx encoder vs HF Longformer and RoBERTa",
                       description="Tokens/s and peak memory of a full masked-LM training step.")
    _common(t)
    t.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 4096)")
    t.add_argument("--models", nargs="+", help="models to run")
    t.add_argument("--layers", type=int)
    t.add_argument("--hidden", type=int)
    t.add_argument("--heads", type=int)
    t.add_argument("--attention-window", type=int, help="two-sided window, as Hugging Face's attention_window")
    t.add_argument("--heldout-steps", type=int, help="steps of the short run whose held-out loss compares bf16 with "
                                                     "fp32 (0: none)")
    t.add_argument("--window", type=int, help=argparse.SUPPRESS)  # the old spelling: refused with a hint
    t.set_defaults(func=functools.partial(_run, "train"))

    h = sub.add_parser("hf", help="Hugging Face ModernBERT/Mistral forward and finetuning step: attn_implementation "
                                  "longctx vs sdpa vs eager", description="Time and peak memory of a forward pass "
                                  "or a finetuning step of ModernBERT- and Mistral-shaped models per attention "
                                  "implementation, length and dtype.")
    _common(h)
    h.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 4096 16384)")
    h.add_argument("--models", nargs="+", help="modernbert and/or mistral")
    h.add_argument("--impl", nargs="+", dest="implementations", help="longctx, sdpa and/or eager")
    h.add_argument("--layers", type=int, help="layers per model (default: ModernBERT 3, Mistral 2)")
    h.add_argument("--hidden", type=int, help="model width, heads of 64 (default: ModernBERT 768, Mistral 1024)")
    h.add_argument("--modes", nargs="+", help="forward and/or train (a finetuning step; default forward)")
    h.add_argument("--dtypes", nargs="+", help="float32 and/or bfloat16 (CPU autocast; default float32)")
    h.set_defaults(func=functools.partial(_run, "hf"))


def _common(p) -> None:
    p.add_argument("--config", help="YAML configuration (see benchmarks/)")
    p.add_argument("--out", help="output folder (default runs/bench-<name>)")
    p.add_argument("--name", help="run name (default from the config)")
    p.add_argument("--repeats", type=int, help="timed runs per case (median reported)")
    p.add_argument("--warmup", type=int, help="untimed runs before timing")
    p.add_argument("--time-cap", type=float, dest="time_cap_s", help="skip a case predicted to take longer (s)")
    p.add_argument("--memory-cap", type=float, dest="memory_cap_gb", help="skip a case predicted to need more (GB)")


def _overrides(args, keys) -> dict:
    if getattr(args, "window", None) is not None:  # one meaning of window (one-sided) everywhere
        raise LongctxError(f"--window is now --attention-window (two-sided, as Hugging Face's; longctx's window is "
                           f"one-sided, half of it): give --attention-window {args.window}")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _command(kind: str, args, overrides: dict) -> str:
    """The command line that reproduces this run (from the parsed options, not sys.argv, so it is right
    when main() is called with its own argument list)."""
    parts = ["longctx", "bench", kind]
    if args.config:
        parts += ["--config", args.config]
    flags = {"implementations": "--impl", "time_cap_s": "--time-cap", "memory_cap_gb": "--memory-cap"}
    for k, v in overrides.items():
        parts.append(flags.get(k, "--" + k.replace("_", "-")))
        parts += [str(x) for x in v] if isinstance(v, list) else [str(v)]
    if args.out:
        parts += ["--out", args.out]
    return shlex.join(parts)


def _out_dir(args, cfg) -> Path:
    return Path(args.out) if args.out else Path("runs") / f"bench-{cfg['name']}"


def _check(cfg) -> None:
    if cfg["repeats"] < 1 or cfg["warmup"] < 0 or cfg.get("heldout_steps", 0) < 0:
        raise LongctxError("--repeats must be at least 1, --warmup and --heldout-steps at least 0")
    if any(n < 1 for n in cfg["lengths"]):
        raise LongctxError("every benchmark length must be a positive number of tokens")


COMMON_KEYS = ["name", "repeats", "warmup", "time_cap_s", "memory_cap_gb", "lengths"]
# each benchmark's own flags, after COMMON_KEYS
BENCH_KEYS = {"attention": ["implementations", "dtypes", "attention_window", "hidden", "heads"],
              "train": ["models", "layers", "hidden", "heads", "attention_window", "heldout_steps"],
              "hf": ["models", "implementations", "layers", "hidden", "modes", "dtypes"]}


def _run(bench: str, args) -> int:
    """Run the benchmark module ``longctx.bench.<bench>``: its DEFAULTS, the config file, the flags on top."""
    module = importlib.import_module(f"longctx.bench.{bench}")
    from longctx.bench import common
    cfg = common.load_config(args.config, module.DEFAULTS, bench)
    over = _overrides(args, COMMON_KEYS + BENCH_KEYS[bench])
    cfg.update(over)
    _check(cfg)
    module.run(cfg, _out_dir(args, cfg), _command(bench, args, over))
    return 0
