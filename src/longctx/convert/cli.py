"""`longctx convert longformer SRC OUT` and `longctx convert extend SRC OUT --max-length N --attention-window W`.

One meaning per name: longctx's ``window`` is one-sided everywhere; the conversion takes Hugging Face's
two-sided size, so its flag carries Hugging Face's name, ``--attention-window``. The old ``--window``
(two-sided here, one-sided everywhere else) is refused with a hint rather than guessed.
"""
from __future__ import annotations

import argparse
import sys

from longctx.errors import LongctxError

# Imports of torch, transformers and of modules that import them stay inside the functions that use them:
# the CLI parser imports this module (`longctx --help` stays fast: tests/test_newcomer.py).


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="bring Hugging Face checkpoints into longctx")
    sub = p.add_subparsers(dest="convert_kind", metavar="KIND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    a = sub.add_parser(
        "longformer", help="a Hugging Face Longformer checkpoint -> a longctx model with the same outputs",
        description="Convert a Hugging Face Longformer checkpoint directory (LongformerModel, "
                    "LongformerForMaskedLM, LongformerForSequenceClassification or LongformerForQuestionAnswering) "
                    "into a longctx model directory that AutoModel* loads after `import longctx`.")
    a.add_argument("src", metavar="SRC", help="Hugging Face checkpoint directory (config.json + weights)")
    a.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty, unless --force)")
    a.add_argument("--force", action="store_true", help="replace OUT if it exists")
    a.set_defaults(func=_run_longformer)

    e = sub.add_parser(
        "extend", help="a short BERT/RoBERTa -> a long longctx masked LM (Longformer's recipe)",
        description="Extend a BERT or RoBERTa checkpoint to --max-length positions by copying its learned "
                    "position table, switch every layer to a sliding window of --attention-window tokens "
                    "(two-sided, as Hugging Face's attention_window: each token sees attention_window/2 on each "
                    "side; the saved config's one-sided window is half of it), initialise the "
                    "global projections from the local ones, and save a longctx masked LM plus the tokenizer "
                    "with the new model_max_length. Continue with `longctx pretrain`.")
    e.add_argument("src", metavar="SRC", help="Hugging Face BERT/RoBERTa checkpoint directory")
    e.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty, unless --force)")
    e.add_argument("--max-length", type=int, required=True, help="positions of the long model, e.g. 4096")
    e.add_argument("--attention-window", type=int,
                   help="two-sided sliding window (even), as Hugging Face's attention_window, e.g. 512 "
                        "(one-sided window 256); required")
    e.add_argument("--window", type=int, help=argparse.SUPPRESS)  # the old spelling: refused with a hint
    e.add_argument("--force", action="store_true", help="replace OUT if it exists")
    e.set_defaults(func=_run_extend)


def _run_longformer(args) -> int:
    from longctx.convert.longformer import convert_longformer_dir

    s = convert_longformer_dir(args.src, args.out, force=args.force)
    print(f"converted {s['source_class']} -> {s['longctx_class']} in {s['out']} "
          f"(one-sided windows {s['window']}, {s['max_position_embeddings']} positions; tokenizer files: "
          f"{', '.join(s['tokenizer_files']) or 'none in the source'})")
    return 0


def _run_extend(args) -> int:
    from longctx.convert.extend import FRESH_HEAD_MESSAGE, extend_dir

    if args.window is not None:
        raise LongctxError(
            f"--window is ambiguous here and no longer taken: longctx's window is one-sided, Hugging Face's "
            f"attention_window two-sided; give --attention-window {args.window} for the old meaning (each token "
            f"sees {args.window // 2} on each side), or --attention-window {2 * args.window} for a one-sided "
            f"window of {args.window}")
    if args.attention_window is None:
        raise LongctxError("give --attention-window W: the two-sided sliding window (even), as Hugging Face's "
                           "attention_window, e.g. 512")
    s = extend_dir(args.src, args.out, args.max_length, args.attention_window, force=args.force)
    print(f"extended {s['source_class']} from {s['source_positions']} to {s['max_position_embeddings']} "
          f"positions, attention_window {s['attention_window']} (one-sided window {s['window']}) -> "
          f"{s['longctx_class']} in {s['out']}; tokenizer: {s['tokenizer']}")
    if s["fresh_head"]:
        print(f"note: {FRESH_HEAD_MESSAGE}")
    sys.stdout.flush()
    return 0
