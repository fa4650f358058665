"""`longctx export MODEL OUT --format onnx|pt2`: an encoder for inference, dynamic in the sequence length."""
from __future__ import annotations
from pathlib import Path

# Imports of torch, transformers and of modules that import them stay inside the functions that use them:
# the CLI parser imports this module (`longctx --help` stays fast: tests/test_newcomer.py).


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export an encoder to ONNX or a torch.export program (.pt2)",
        description="Export a saved longctx encoder (masked LM, sequence classification or question answering) "
                    "for inference: inputs input_ids and attention_mask (int64, batch x seq), any batch size and "
                    "any length up to max_position_embeddings. ONNX runs in onnxruntime; .pt2 loads with "
                    "torch.export.load. Decoders (generation with a key-value cache) cannot be exported.")
    p.add_argument("model", metavar="MODEL", help="longctx model folder (config.json + weights)")
    p.add_argument("out", metavar="OUT", help="file to write, e.g. model.onnx or model.pt2")
    p.add_argument("--format", choices=("onnx", "pt2"), default=None,
                   help="output format (default: from OUT's suffix, else onnx)")
    p.add_argument("--max-global", type=int, default=None,
                   help="global-token slots in the exported graph (default 1 for classification; for QA 65: "
                        "<cls> and the 64 question tokens finetuning keeps); a QA row whose question has more "
                        "global tokens gets NaN logits, so give more slots for longer questions")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from longctx.export import export_model

    fmt = args.format or ("pt2" if Path(args.out).suffix == ".pt2" else "onnx")
    out = export_model(args.model, args.out, fmt, max_global=args.max_global)
    print(f"wrote {out} ({fmt}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0
