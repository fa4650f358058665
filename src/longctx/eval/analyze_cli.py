"""`longctx analyze attention MODEL`: where a saved model's attention goes (see ``eval/analysis.py``)."""
from __future__ import annotations

import sys
from pathlib import Path

# Imports of torch, transformers and of modules that import them stay inside the functions that use them:
# the CLI parser imports this module (`longctx --help` stays fast: tests/test_newcomer.py).


def run(args) -> int:
    from longctx.eval.analysis import analyze_saved, markdown, write_analysis

    common = dict(data=args.data, max_docs=args.max_docs, seq_len=args.seq_len, global_tokens=args.global_tokens,
                  window=args.window)
    results = {_name(args.model): analyze_saved(args.model, **common)}
    if args.compare:
        other = _name(args.compare)
        if other in results:
            other = f"{other} (2)"
        results[other] = analyze_saved(args.compare, **common)
    out = Path(args.out or Path(args.model) / "analysis")
    paths = write_analysis(results, out)
    text = markdown(results)
    table = text[text.index("| model | layer |"):text.index("\n\nPer head")]
    print(table)
    print(f"analysis of {', '.join(results)} in {paths['md']} ({paths['json'].name}, "
          f"{paths['heatmaps'].name}, {paths['distance'].name})", file=sys.stderr)
    return 0


def _name(model: str) -> str:
    """A short label for a model folder: runs/x/variant/model -> variant."""
    p = Path(model).resolve()
    return p.parent.name if p.name == "model" else p.name


def register(sub) -> None:
    p = sub.add_parser("analyze", help="analyse a model's attention (mass on global and heading tokens, distance)",
                       description="Analyse where a saved model's attention goes.")
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    a = what.add_parser("attention", help="per layer and head: mass on global tokens, headings, own sentence; "
                                          "distance; entropy",
                        description="Per layer and head, over the first tokens of each document: the share of "
                                    "attention mass on global tokens, on heading tokens (from the corpus's "
                                    "structure spans), on the query's own sentence, the mean distance, the share "
                                    "beyond the window, and the row entropy. Writes analysis.json, analysis.md and "
                                    "plots (per-layer x head heatmaps, distance curves); with --compare, both "
                                    "models side by side.")
    a.add_argument("model", help="a saved longctx model folder (e.g. runs/structformer/headings-global/model)")
    a.add_argument("--data", help="documents to analyse: a structured.jsonl from `longctx corpus arxiv`, any "
                                  "corpus file or folder (default: the held-out documents of the model's own "
                                  "training corpus)")
    a.add_argument("--max-docs", type=int, default=8, help="documents to analyse (default 8)")
    a.add_argument("--compare", metavar="OTHER_MODEL", help="a second model folder, analysed on the same documents")
    a.add_argument("--out", help="output folder (default MODEL/analysis)")
    a.add_argument("--seq-len", type=int, help="tokens per document (default: the model's training length)")
    a.add_argument("--global-tokens", default="auto", choices=("auto", "none", "first", "headings"),
                   help="global tokens during the analysis (default auto: as the model was trained)")
    a.add_argument("--window", type=int, help="window for 'beyond the window' on layers without one of their own")
    a.set_defaults(func=run)
