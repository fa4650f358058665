"""`longctx pretrain` and `longctx eval`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from longctx.errors import LongctxError


def _config(args) -> dict:
    from longctx.train.config import load_yaml, resolve
    return resolve(load_yaml(args.config) if args.config else {}, args.overrides)


def run_pretrain(args) -> int:
    from longctx.train.loop import pretrain
    cfg = _config(args)
    out = Path(args.out or Path("runs") / cfg["name"])
    result = pretrain(cfg, out, resume=args.resume, progress=not args.quiet)
    ev = result["eval"]
    # a loss over no tokens is not a result: say so rather than print 0.0000
    quality = (f"held-out loss {ev['loss']:.4f} (perplexity {ev['perplexity']:.2f})" if ev.get("loss") is not None
               else "no held-out tokens were evaluated")
    print(f"{quality} after {result['steps']} steps, "
          f"{result['tokens_per_s']:,.0f} tokens/s; model in {out / 'model'}, results in {out / 'results.json'}")
    return 0


def run_eval(args) -> int:
    """Held-out loss of a saved model, at one or several sequence lengths (length extrapolation)."""
    import math

    import torch
    from transformers import AutoConfig

    import longctx  # noqa: F401
    from longctx.data.collate import CLMCollator, MLMCollator
    from longctx.data.packing import PackedDataset, prepare_data
    from longctx.models import LongctxForCausalLM, LongctxForMaskedLM
    from longctx.train.loop import evaluate

    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        raise LongctxError(f"{model_dir} is not a saved model folder (no config.json)")
    cfg = _config(args)
    d = cfg["data"]
    mcfg = AutoConfig.from_pretrained(model_dir)
    causal = bool(getattr(mcfg, "causal", False))
    model = (LongctxForCausalLM if causal else LongctxForMaskedLM).from_pretrained(model_dir).eval()
    if args.blockwise:
        if not causal:
            raise LongctxError("--blockwise applies to causal (decoder) models only")
        from longctx.attention import AttentionPattern
        for layer in model.longctx.layers:  # LeX: no query sees a span longer than it was trained on
            layer.attention.pattern = AttentionPattern("blockwise_causal", block=args.blockwise)
    tokenizer = d["tokenizer"] if args.tokenizer is None else args.tokenizer
    if (model_dir / "tokenizer.json").exists() and args.tokenizer is None:
        tokenizer = str(model_dir)
    data = prepare_data(d["corpus"], tokenizer, d["valid_fraction"], cfg["seed"], d["text_field"])
    collator = CLMCollator(data.tokenizer) if causal else MLMCollator(data.tokenizer, d["mlm_probability"],
                                                                      d["global_tokens"], cfg["seed"])
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [d["seq_len"]]
    rows = []
    for n in lengths:
        ds = PackedDataset(data.valid, n)
        if len(ds) == 0:
            raise LongctxError(f"the held-out text has {len(data.valid)} tokens, fewer than length {n}")
        with torch.no_grad():
            ev = evaluate(model, ds, collator, cfg["train"]["eval_batches"], cfg["train"]["batch_size"])
        if causal:
            ev["bits_per_char"] = ev["loss"] * len(data.valid) / max(1, data.valid_chars) / math.log(2)
        if args.resolution and causal:
            from longctx.eval.resolution import model_resolution
            if n > 4096:
                raise LongctxError("--resolution builds n x n scores: use lengths up to 4096")
            res = model_resolution(model, ds[0]["input_ids"][None])
            ev["attention_resolution"] = sum(res) / len(res)
            ev["attention_resolution_by_layer"] = res
        rows.append({"length": n, **ev})
        print(f"length {n:>7}: loss {ev['loss']:.4f}  perplexity {ev['perplexity']:.2f}"
              + (f"  bpc {ev['bits_per_char']:.3f}" if causal else "")
              + (f"  resolution {ev['attention_resolution']:.4f}" if "attention_resolution" in ev else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _common(p):
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config values, e.g. train.steps=200 model.window=128 data.corpus=docs/")


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (masked or causal LM)",
                       description="Pretrain a longctx model on a corpus; writes checkpoints, logs and the final model.")
    _common(p)
    p.add_argument("--out", help="output folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_pretrain)

    e = sub.add_parser("eval", help="held-out loss / perplexity of a saved model, at several lengths",
                       description="Evaluate a saved model on held-out documents; --lengths 512,1024,2048 "
                                   "measures length extrapolation.")
    e.add_argument("model", help="a saved longctx model folder")
    _common(e)
    e.add_argument("--lengths", help="comma-separated sequence lengths (default data.seq_len)")
    e.add_argument("--tokenizer", help="tokenizer (default: the one saved with the model)")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("--blockwise", type=int, metavar="B",
                   help="evaluate a decoder with LeX's blockwise causal attention of block B (e.g. the training length)")
    e.add_argument("--resolution", action="store_true",
                   help="also report the attention resolution (LeX) of each layer, for decoders")
    e.set_defaults(func=run_eval)
