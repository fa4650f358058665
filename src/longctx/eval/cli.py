"""`longctx eval`: held-out quality of a saved model at one or several lengths.

For a causal LM this is LeX's length-extrapolation protocol (``longctx.eval.extrapolation``): the same
tokens are scored at every length, with a 95% interval over documents, optionally with blockwise causal
attention (``--blockwise``: blocks of half the training length, or ``--blockwise B``) and attention
resolution (``--resolution``). For a masked LM it is the held-out masked-token loss of packed blocks.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from longctx.errors import LongctxError
from longctx.io import write_json

# Imports of torch, transformers and of modules that import them stay inside the functions that use them:
# the CLI parser imports this module (`longctx --help` stays fast: tests/test_newcomer.py).

HALF = "half"  # --blockwise with no value: half the training length (LeX)


def parse_lengths(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise LongctxError(f"--lengths {text!r} must be comma-separated positive integers, e.g. 512,1024,2048")
    return lengths


def training_length(model_dir: Path) -> int:
    """The sequence length a model was trained at (its last stage's), from the run folder that holds it."""
    for name, get in (("results.json", lambda r: r.get("seq_len")),
                      ("run_config.json", lambda r: (r.get("data") or {}).get("seq_len"))):
        f = model_dir.parent / name
        if f.is_file():
            try:
                n = get(json.loads(f.read_text()))
            except (ValueError, AttributeError):
                n = None
            if isinstance(n, int) and n > 0:
                return n
    raise LongctxError(f"cannot tell the training length of {model_dir} (no results.json in its run folder); "
                       "give the block size with --blockwise B")


def _training_data(model_dir: Path) -> dict:
    """With no --config: the data section the model was trained with (its run folder's run_config.json),
    so that its held-out documents and tokenizer are the defaults; {} when there is none."""
    f = model_dir.parent / "run_config.json"
    try:
        data = json.loads(f.read_text()).get("data") if f.is_file() else None
    except (ValueError, AttributeError):
        data = None
    return {"data": data} if isinstance(data, dict) else {}


def block_size(arg, model_dir: Path) -> int | None:
    """--blockwise: None (off), HALF (half the training length) or a positive integer."""
    if arg is None:
        return None
    if arg == HALF:
        from longctx.eval.extrapolation import blockwise_block
        return blockwise_block(training_length(model_dir))
    try:
        b = int(arg)
    except ValueError:
        b = 0
    if b < 1:
        raise LongctxError(f"--blockwise {arg!r} must be a positive block size (or no value: half the training length)")
    return b


def _json_target(path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise LongctxError(f"--json {path} is a folder; give a file name, e.g. {p / 'eval.json'}")
    if not p.parent.is_dir():
        raise LongctxError(f"--json {path}: folder {p.parent} does not exist; create it or write elsewhere")
    return p


def _model_config(model_dir: Path) -> dict:
    """config.json of a longctx model folder (read as JSON), refusing a folder that is not one."""
    try:
        from longctx.models.loading import read_longctx_config
    except ImportError:  # before the safe-loading helper exists
        read_longctx_config = None
    if read_longctx_config is not None:
        return read_longctx_config(model_dir)
    f = model_dir / "config.json"
    if not f.is_file():
        raise LongctxError(f"{model_dir} is not a saved model folder (no config.json)")
    cfg = json.loads(f.read_text())
    if cfg.get("model_type") != "longctx":
        raise LongctxError(f"{model_dir} holds a {cfg.get('model_type')!r} model, not a longctx model")
    return cfg


LM_CLASSES = ("LongctxForMaskedLM", "LongctxForCausalLM")


def _require_lm_head(model_dir: Path, cfg: dict) -> None:
    """Refuse a model saved without a language-model head (a finetuned task model): loaded as an LM, its
    head would be freshly initialised and its perplexity that of random weights."""
    arch = (cfg.get("architectures") or [LM_CLASSES[0]])[0]
    if arch not in LM_CLASSES:
        raise LongctxError(f"{model_dir} is a {arch} model, without the language-model head `longctx eval` "
                           "scores with; give a pretrained model (a run's model/ folder; a finetuned model's task "
                           "scores are in its run's results.json)")


def run_eval(args) -> int:
    import longctx  # noqa: F401
    from longctx.data.packing import prepare_data
    from longctx.data.tokenizer import ByteTokenizer
    from longctx.eval.extrapolation import load_model
    from longctx.models import LongctxForCausalLM
    from longctx.train.config import load_yaml, resolve

    model_dir = Path(args.model)
    lengths = parse_lengths(args.lengths)
    json_path = _json_target(args.json)
    raw = load_yaml(args.config) if args.config else _training_data(model_dir)
    # the model comes from its folder: the config's model section is not used, so its default sliding
    # window must not refuse a short data.seq_len
    raw = {**raw, "model": {**(raw.get("model") or {}), "attention": "full"}}
    cfg = resolve(raw, list(args.overrides) + args.late_overrides)
    # every argument is checked before anything heavy is loaded
    model_cfg = _model_config(model_dir)
    _require_lm_head(model_dir, model_cfg)
    causal = bool(model_cfg.get("causal", False))
    if not causal and (args.blockwise is not None or args.resolution or args.stride):
        flag = "--blockwise" if args.blockwise is not None else "--resolution" if args.resolution else "--stride"
        raise LongctxError(f"{flag} applies to causal LMs (decoders); {model_dir} is a masked LM")
    block = block_size(args.blockwise, model_dir)
    for flag, value in (("--tokens", args.tokens), ("--stride", args.stride), ("--max-docs", args.max_docs)):
        if value is not None and value < 1:
            raise LongctxError(f"{flag} {value} must be a positive integer")
    if args.resolution and lengths and max(lengths) > 4096:
        raise LongctxError("--resolution builds n x n scores: use lengths up to 4096")
    model = load_model(model_dir)  # never runs code from the folder
    assert isinstance(model, LongctxForCausalLM) == causal
    d = cfg["data"]
    tokenizer = args.tokenizer or (str(model_dir) if (model_dir / "tokenizer.json").exists() else d["tokenizer"])
    data = prepare_data(d["corpus"], tokenizer, d["valid_fraction"], cfg["seed"], d["text_field"])
    lengths = lengths or [d["seq_len"]]
    if data.tokenizer.vocab_size > model.config.vocab_size:
        raise LongctxError(f"the tokenizer ({data.tokenizer.vocab_size} tokens) is not the model's (vocabulary of "
                           f"{model.config.vocab_size}); give the one it was trained with (data.tokenizer= or --config)")
    if not causal:
        rows = _masked_lm_rows(model, data, cfg, lengths)
    else:
        from longctx.eval.extrapolation import extrapolation, format_row
        res = extrapolation(model, data.valid, lengths, tokens=args.tokens, stride=args.stride, blockwise=block,
                            resolution=args.resolution, bits_per_char=isinstance(data.tokenizer, ByteTokenizer),
                            max_docs=args.max_docs, batch_size=cfg["train"]["batch_size"],
                            progress=lambda row: print(format_row(row), flush=True))
        print(f"scored the same {res['tokens']:,} tokens of each of {res['documents']} held-out {res['units']} "
              f"at every length" + (f", blockwise causal attention with blocks of {block}" if block else ""))
        rows = [{**row, **{k: res[k] for k in ("tokens", "units", "documents", "stride", "blockwise")}}
                for row in res["rows"]]
    if json_path:
        write_json(json_path, rows)
    return 0


def _masked_lm_rows(model, data, cfg, lengths: list[int]) -> list[dict]:
    """Held-out masked-token loss at each length (packed blocks, fixed masks)."""
    import torch

    from longctx.data.collate import MLMCollator
    from longctx.data.packing import PackedDataset
    from longctx.train.loop import evaluate

    d = cfg["data"]
    collator = MLMCollator(data.tokenizer, d["mlm_probability"], d["global_tokens"], cfg["seed"])
    rows = []
    for n in lengths:
        if len(data.valid) < n:
            raise LongctxError(f"the held-out text has {len(data.valid)} tokens, fewer than length {n}")
        with torch.no_grad():
            ev = evaluate(model, PackedDataset(data.valid, n), collator, cfg["train"]["eval_batches"],
                          cfg["train"]["batch_size"])
        rows.append({"length": n, **ev})
        print(f"length {n:>7}: loss {ev['loss']:.4f}  perplexity {ev['perplexity']:.2f}", flush=True)
    return rows


class _Blockwise(argparse.Action):
    """``--blockwise`` [B]: no value means half the training length. A ``KEY=VALUE`` right after it is an
    override, not a block size (argparse would otherwise take it as the flag's value)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value is not None and "=" in value:
            namespace.late_overrides = [*getattr(namespace, "late_overrides", []), value]
            value = None
        namespace.blockwise = HALF if value is None else value


def register(sub) -> None:
    e = sub.add_parser(
        "eval", help="held-out perplexity of a saved model at several lengths (length extrapolation)",
        description="Evaluate a saved model on held-out documents. For a causal LM, --lengths 512,1024,2048 "
                    "measures length extrapolation with LeX's protocol: the first T tokens of each held-out "
                    "document (T = --tokens, default 4,096 or the largest length), split into chunks of each "
                    "length, so the same tokens are scored at every length; perplexity (bits per character "
                    "for byte tokens) with a 95% interval over documents.")
    e.add_argument("model", help="a saved longctx model folder")
    e.add_argument("--config", help="YAML config file for the data (see configs/)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config values, e.g. data.corpus=docs/ (before or after the options)")
    e.add_argument("--lengths", help="comma-separated sequence lengths (default data.seq_len)")
    e.add_argument("--tokens", type=int, metavar="T",
                   help="score the first T tokens of each held-out document (default 4096, or the largest length)")
    e.add_argument("--stride", type=int, metavar="S",
                   help="sliding evaluation: windows of each length moved by S, each scoring its last S tokens")
    e.add_argument("--max-docs", type=int, default=64, help="evaluate at most this many documents (default 64)")
    e.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model, else data.tokenizer)")
    e.add_argument("--json", help="also write the rows to this JSON file")
    e.add_argument("--blockwise", nargs="?", action=_Blockwise, metavar="B",
                   help="LeX's blockwise causal attention (decoders); blocks of B tokens, with no value half "
                        "the training length (LeX's rule: no query sees more than the training length)")
    e.add_argument("--resolution", action="store_true",
                   help="also report the attention resolution (LeX) of the attention used, for decoders")
    e.set_defaults(func=run_eval, late_overrides=[])
