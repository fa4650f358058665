"""Where attention puts its mass (``longctx analyze attention``): StructFormer's question, asked of any model.

For every layer and head, over every real query token of the analysed documents, the mean of:

- ``global_share``: attention mass on the tokens that are global in this run (its global-attention mask);
- ``heading_share``: mass on heading tokens (title and section headings, from the corpus's structure
  spans; ``heading_fraction`` is the share a uniform row would give them, the baseline to read it against);
- ``sentence_share``: mass on the query's own sentence;
- ``mean_distance``: the expected |i - j| under the row;
- ``beyond_window``: mass on keys farther than the layer's window (sliding layers; the analysis
  ``window`` otherwise), which only global tokens or a non-local mechanism can carry;
- ``entropy``: the row's entropy in nats (log n for a uniform row, 0 for one key; negative entries of an
  effective matrix are left out);
- ``row_sum_min`` / ``row_sum_max``: every row is a probability distribution; these say so.

plus the distance profile: the share of mass at each distance bin (0, 1, 2-3, 4-7, ...), per layer and
head. The matrices come from the models' ``output_attentions`` (each mechanism's ``attention_map``: the
exact probabilities of the mask family, the effective matrix of the approximate ones), so what is shown
is what the model computed. Results go to ``analysis.json``, ``analysis.md`` and PNG plots (layer x head
heatmaps and distance curves), for one model or two side by side.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from longctx import plots
from longctx.data.corpus import load_documents, split_documents
from longctx.data.packing import heading_flags
from longctx.data.tokenizer import load_tokenizer
from longctx.errors import LongctxError
from longctx.io import write_json, write_text
from longctx.models.loading import load_longctx_model, run_settings

METRICS = ("global_share", "heading_share", "sentence_share", "mean_distance", "beyond_window", "entropy")
LABELS = {"global_share": "mass on global tokens", "heading_share": "mass on heading tokens",
          "sentence_share": "mass on own sentence", "mean_distance": "mean distance (tokens)",
          "beyond_window": "mass beyond the window", "entropy": "row entropy (nats)"}
# sentence ends: ., ! or ? followed by white space, or a line break (headings stand on their own line)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def distance_bins(n: int) -> list[int]:
    """Bin edges 0, 1, 2, 4, 8, ... up to n: bin b holds distances in [edges[b], edges[b+1])."""
    edges = [0, 1]
    while edges[-1] < n:
        edges.append(edges[-1] * 2)
    return edges


# ---- inputs ------------------------------------------------------------------------------------------
def sentence_ids(text: str, offsets) -> np.ndarray:
    """One sentence number per token (from its first character); -1 for tokens without characters."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    sid = np.searchsorted(np.asarray(ends, dtype=np.int64), offs[:, 0], side="right")
    return np.where(offs[:, 1] > offs[:, 0], sid, -1)


def document_windows(docs: list[dict], tokenizer, seq_len: int, max_docs: int = 0) -> list[dict]:
    """The first ``seq_len`` tokens of each document (the title and first sections, where the heading
    tokens are): {input_ids, heading, sentence} as (n,) tensors, documents of fewer than 8 tokens skipped."""

    out = []
    for doc in docs:
        if max_docs and len(out) >= max_docs:
            break
        ids, offsets = tokenizer.encode(doc["text"])
        ids, offsets = ids[:seq_len], np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:seq_len]
        if len(ids) < 8:
            continue
        out.append({"id": doc.get("id", str(len(out))), "input_ids": torch.as_tensor(ids, dtype=torch.long),
                    "heading": torch.from_numpy(heading_flags(doc.get("structure"), offsets)),
                    "sentence": torch.from_numpy(sentence_ids(doc["text"], offsets))})
    if not out:
        raise LongctxError("no document to analyse has 8 tokens or more; give longer documents with --data")
    return out


def global_mask_for(window: dict, preset: str) -> torch.Tensor:
    """The run's global-attention preset on one window: none, first (token 0) or headings."""
    n = len(window["input_ids"])
    if preset == "headings":
        return window["heading"].clone()
    g = torch.zeros(n, dtype=torch.bool)
    if preset == "first":
        g[0] = True
    elif preset != "none":
        raise LongctxError(f"global tokens {preset!r} are unknown; use none, first or headings")
    return g


# ---- the statistics ------------------------------------------------------------------------------------
class AttentionStats:
    """Sums over query rows, per layer and head, of each metric; ``result()`` divides by the row count."""

    def __init__(self, num_layers: int, num_heads: int, windows: list[int | None], max_len: int):
        self.L, self.H, self.windows = num_layers, num_heads, windows
        self.edges = distance_bins(max_len)
        self.sums = {m: torch.zeros(num_layers, num_heads, dtype=torch.float64) for m in METRICS}
        self.profile = torch.zeros(num_layers, num_heads, len(self.edges) - 1, dtype=torch.float64)
        self.row_min = torch.full((num_layers, num_heads), math.inf, dtype=torch.float64)
        self.row_max = torch.full((num_layers, num_heads), -math.inf, dtype=torch.float64)
        self.entry_min = torch.full((num_layers, num_heads), math.inf, dtype=torch.float64)
        self.rows = 0
        self.tokens = self.heading_tokens = self.global_tokens = 0

    @torch.no_grad()
    def add(self, attentions, real, global_mask, heading, sentence) -> None:
        """attentions: per layer (B, H, n, n); real, global_mask, heading: (B, n) bool; sentence (B, n) long."""
        B, n = real.shape
        pos = torch.arange(n)
        dist = (pos[:, None] - pos[None, :]).abs().double()                               # (n, n)
        same = (sentence[:, :, None] == sentence[:, None, :]) & (sentence[:, :, None] >= 0)  # (B, n, n)
        keys = {"global_share": global_mask, "heading_share": heading}
        rows = real[:, None, :].double()                                                  # (B, 1, n) queries
        bins = [((dist >= a) & (dist < b)).double() for a, b in zip(self.edges[:-1], self.edges[1:])]
        for layer, A in enumerate(attentions):
            A = A.double()                                                                # (B, H, n, n)
            per_row = {name: A @ k.double()[:, None, :, None] for name, k in keys.items()}  # (B, H, n, 1)
            per_row["sentence_share"] = (A * same[:, None].double()).sum(-1, keepdim=True)
            per_row["mean_distance"] = (A * dist).sum(-1, keepdim=True)
            w = self.windows[layer]
            per_row["beyond_window"] = (A * (dist > w).double()).sum(-1, keepdim=True) if w is not None \
                else torch.full_like(per_row["mean_distance"], math.nan)
            P = A.clamp_min(0.0)
            per_row["entropy"] = -(P * torch.log(P.clamp_min(1e-300))).sum(-1, keepdim=True)
            for name, v in per_row.items():
                self.sums[name][layer] += (v.squeeze(-1) * rows).sum((0, 2))
            for b, m in enumerate(bins):
                self.profile[layer, :, b] += ((A * m).sum(-1) * rows).sum((0, 2))
            s = A.sum(-1).masked_fill(~real[:, None, :], math.nan)                        # (B, H, n)
            self.row_min[layer] = torch.minimum(self.row_min[layer], s.nan_to_num(math.inf).amin((0, 2)))
            self.row_max[layer] = torch.maximum(self.row_max[layer], s.nan_to_num(-math.inf).amax((0, 2)))
            e = A.masked_fill(~real[:, None, :, None], math.inf).amin((0, 2, 3))
            self.entry_min[layer] = torch.minimum(self.entry_min[layer], e)
        self.rows += int(real.sum())
        self.tokens += int(real.sum())
        self.heading_tokens += int((heading & real).sum())
        self.global_tokens += int((global_mask & real).sum())

    def result(self) -> dict:
        if not self.rows:
            raise LongctxError("no token was analysed; give documents with text")
        mean = {m: (s / self.rows) for m, s in self.sums.items()}
        prof = self.profile / self.rows
        layers = []
        for layer in range(self.L):
            heads = [{"head": h, **{m: _num(mean[m][layer, h]) for m in METRICS},
                      "row_sum_min": _num(self.row_min[layer, h]), "row_sum_max": _num(self.row_max[layer, h]),
                      "distance_profile": [_num(x) for x in prof[layer, h]]} for h in range(self.H)]
            avg = {m: _num(mean[m][layer].mean()) for m in METRICS}
            # Linformer's and Nystromformer's effective matrices are not distributions (rows need not sum
            # to one, entries may be negative): their shares are of that matrix, and the report says so
            stochastic = bool((self.row_min[layer] > 1 - 1e-4).all() and (self.row_max[layer] < 1 + 1e-4).all()
                              and (self.entry_min[layer] > -1e-9).all())
            layers.append({"layer": layer, "window": self.windows[layer], "stochastic": stochastic, "mean": avg,
                           "heads": heads})
        return {"tokens": self.tokens, "heading_fraction": self.heading_tokens / self.tokens,
                "global_fraction": self.global_tokens / self.tokens, "distance_bins": self.edges,
                "layers": layers}


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def layer_windows(model, window: int | None = None) -> list[int | None]:
    """Each layer's one-sided window (its sliding pattern's), else ``window`` (None: not reported)."""
    out = []
    for layer in _base(model).layers:
        p = layer.attention.pattern
        out.append(p.window if p is not None and p.kind == "sliding" else window)
    return out


def _base(model):
    return getattr(model, "longctx", model)


@torch.no_grad()
def analyze_model(model, windows: list[dict], global_tokens: str = "none", batch_size: int = 1,
                  window: int | None = None) -> dict:
    """The statistics of ``model`` (a longctx model, any head) over the document ``windows``."""
    base = _base(model)
    was_training = base.training
    base.eval()
    cfg = base.config
    stats = AttentionStats(cfg.num_hidden_layers, cfg.num_attention_heads, layer_windows(model, window),
                           max(len(w["input_ids"]) for w in windows))
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        n = max(len(w["input_ids"]) for w in batch)
        ids = torch.full((len(batch), n), cfg.pad_token_id, dtype=torch.long)
        real = torch.zeros(len(batch), n, dtype=torch.bool)
        glob, head = torch.zeros_like(real), torch.zeros_like(real)
        sent = torch.full((len(batch), n), -1, dtype=torch.long)
        for r, w in enumerate(batch):
            k = len(w["input_ids"])
            ids[r, :k], real[r, :k], head[r, :k], sent[r, :k] = w["input_ids"], True, w["heading"], w["sentence"]
            glob[r, :k] = global_mask_for(w, global_tokens)
        dev = next(base.parameters()).device
        out = base(ids.to(dev), attention_mask=real.long().to(dev), global_attention_mask=glob.to(dev),
                   output_attentions=True)
        stats.add([a.cpu() for a in out.attentions], real, glob, head, sent)
    base.train(was_training)
    res = stats.result()
    res["documents"] = len(windows)
    res["global_tokens"] = global_tokens
    res["mechanisms"] = [layer.attention.mechanism.describe() for layer in base.layers]
    return res


# ---- a saved model -------------------------------------------------------------------------------------
def analysis_documents(data: str | None, run: dict, max_docs: int) -> tuple[list[dict], str]:
    """The documents to analyse and a phrase saying which: ``data`` when given, else the held-out
    documents of the corpus the model was trained on."""

    if data:
        return load_documents(data), str(data)
    d = run.get("data") or {}
    if not d.get("corpus"):
        raise LongctxError("the model folder records no training corpus; give the documents to analyse with --data")
    docs = load_documents(d["corpus"], d.get("text_field", "text"))
    train, valid = split_documents(docs, d.get("valid_fraction", 0.05), run.get("seed", 0))
    # held-out documents first; the training documents only if there are too few
    if max_docs and len(valid) < max_docs:
        return valid + train, f"the {len(valid)} held-out documents of {d['corpus']}, then training documents"
    return valid or train, f"held-out documents of {d['corpus']}"


def analyze_saved(model_dir: str | Path, data: str | None = None, max_docs: int = 8, seq_len: int | None = None,
                  global_tokens: str = "auto", window: int | None = None) -> dict:
    """Load the model and its tokenizer from ``model_dir`` and analyse it (see ``analyze_model``)."""

    model = load_longctx_model(model_dir, what="model")
    run = run_settings(model_dir)
    tok = load_tokenizer(str(model_dir))
    if global_tokens == "auto":
        global_tokens = (run.get("data") or {}).get("global_tokens", "none")
    seq_len = seq_len or (run.get("data") or {}).get("seq_len") or model.config.max_position_embeddings
    seq_len = min(seq_len, model.config.max_position_embeddings)
    docs, source = analysis_documents(data, run, max_docs)
    windows = document_windows(docs, tok, seq_len, max_docs)
    res = analyze_model(model, windows, global_tokens, window=window)
    res.update(model=str(model_dir), data=source, seq_len=seq_len)
    return res


# ---- reports -------------------------------------------------------------------------------------------
def write_analysis(results: dict[str, dict], out_dir: str | Path) -> dict[str, Path]:
    """``analysis.json``, ``analysis.md`` and the plots for one or more named analyses (side by side)."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "analysis.json", "md": out / "analysis.md"}
    write_json(paths["json"], results)
    paths.update(plot_analysis(results, out))
    write_text(paths["md"], markdown(results, {k: p.name for k, p in paths.items() if p.suffix == ".png"}))
    return paths


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def summary_rows(results: dict[str, dict]) -> list[list[str]]:
    """One row per model and layer: the head-averaged metrics."""
    rows = []
    for name, res in results.items():
        for layer in res["layers"]:
            rows.append([name, str(layer["layer"]), *(_fmt(layer["mean"][m]) for m in METRICS)])
    return rows


def markdown(results: dict[str, dict], plots: dict[str, str] | None = None) -> str:
    names = list(results)
    lines = ["# Attention analysis", ""]
    for name, res in results.items():
        lines.append(f"- **{name}**: {res.get('model', '')}: {res['documents']} documents, {res['tokens']:,} tokens "
                     f"({res.get('data', '')}); global tokens: {res['global_tokens']} "
                     f"({100 * res['global_fraction']:.1f}% of tokens); heading tokens {100 * res['heading_fraction']:.1f}% "
                     f"of tokens (what a uniform row would give them); attention: {', '.join(res['mechanisms'])}")
    lines += ["", "Per layer, averaged over heads and over every real query token:", "",
              "| model | layer | " + " | ".join(LABELS[m] for m in METRICS) + " |",
              "|---" * (2 + len(METRICS)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(results)]
    lines += ["", "Per head:", "", "| model | layer | head | " + " | ".join(LABELS[m] for m in METRICS)
              + " | row sums |", "|---" * (4 + len(METRICS)) + "|"]
    for name, res in results.items():
        for layer in res["layers"]:
            for h in layer["heads"]:
                lines.append(f"| {name} | {layer['layer']} | {h['head']} | "
                             + " | ".join(_fmt(h[m]) for m in METRICS)
                             + f" | {h['row_sum_min']:.4f}-{h['row_sum_max']:.4f} |")
    lines += ["", "Mass on own sentence counts tokens in the same sentence (split at . ! ? and line breaks); "
              "mean distance is in tokens; mass beyond the window is n/a for layers without one; "
              "the distance profile (the plot, and `distance_profile` in analysis.json) bins distances as "
              f"{', '.join(_bin_names(results[names[0]]['distance_bins']))}."]
    for key, file in (plots or {}).items():
        lines += ["", f"![{key}]({file})"]
    return "\n".join(lines) + "\n"


def _bin_names(edges: list[int]) -> list[str]:
    return [str(a) if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]


def plot_analysis(results: dict[str, dict], out: Path) -> dict[str, Path]:
    plt = plots.pyplot()

    names, paths = list(results), {}
    shown = [m for m in METRICS if any(h[m] is not None for r in results.values() for l in r["layers"] for h in l["heads"])]
    fig, axes = plt.subplots(len(names), len(shown), figsize=(2.6 * len(shown), 2.4 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c, m in enumerate(shown):
            grid = np.array([[np.nan if h[m] is None else h[m] for h in l["heads"]] for l in results[name]["layers"]])
            # one colour scale per metric across models, so the two rows compare directly
            allv = np.array([h[m] for res in results.values() for l in res["layers"] for h in l["heads"]
                             if h[m] is not None] or [0.0])
            im = axes[r, c].imshow(grid, aspect="auto", cmap="viridis", vmin=allv.min(), vmax=max(allv.max(), allv.min() + 1e-9))
            axes[r, c].set_title(f"{name}\n{LABELS[m]}" if c == 0 else LABELS[m], fontsize=8)
            # a tick per layer and head at the cell centres, numbered from 0 as analysis.md and the report
            # number them (imshow's default ticks read -0.5, 0.0, 0.5 for one layer)
            axes[r, c].set_yticks(range(grid.shape[0]), [f"layer {layer['layer']}" for layer in results[name]["layers"]],
                                  fontsize=7)
            axes[r, c].set_xticks(range(grid.shape[1]), [str(h) for h in range(grid.shape[1])], fontsize=7)
            axes[r, c].set_xlabel("head", fontsize=7)
            fig.colorbar(im, ax=axes[r, c])
    paths["heatmaps"] = plots.save(fig, out / "attention_heatmaps.png", dpi=110)
    fig, ax = plt.subplots(1, len(results[names[0]]["layers"]), figsize=(3.2 * len(results[names[0]]["layers"]), 2.8),
                           squeeze=False)
    for li in range(len(results[names[0]]["layers"])):
        for name in names:
            res = results[name]
            if li >= len(res["layers"]):
                continue
            prof = np.mean([h["distance_profile"] for h in res["layers"][li]["heads"]], axis=0)
            ax[0, li].plot(range(len(prof)), prof, marker="o", label=name)
        labels = _bin_names(results[names[0]]["distance_bins"])
        ax[0, li].set_xticks(range(len(labels)), labels, rotation=60, fontsize=6)
        ax[0, li].set_title(f"layer {li}", fontsize=8)
        ax[0, li].set_xlabel("distance |i - j| (tokens)", fontsize=7)
        ax[0, li].set_ylabel("share of attention mass", fontsize=7)
        ax[0, li].legend(fontsize=6)
    paths["distance"] = plots.save(fig, out / "attention_distance.png", dpi=110)
    return paths


# ---- the `analysis:` section of a comparison (`longctx compare`) ----------------------------------------
SPEC_KEYS = {"data": None, "max_docs": 8, "seq_len": None, "window": None}


def check_spec(spec) -> dict:
    """``analysis: {max_docs: 8}`` (also ``data``, ``seq_len``, ``window``; ``true`` for the defaults)."""
    if spec is True:
        spec = {}
    if not isinstance(spec, dict):
        raise LongctxError(f"the analysis section takes {', '.join(SPEC_KEYS)} (or true), got {spec!r}")
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise LongctxError(f"analysis has unknown keys {sorted(unknown)}; use {', '.join(SPEC_KEYS)}")
    return {**SPEC_KEYS, **spec}


def analyze_variant(name: str, vdir: Path, spec: dict, progress: bool = True) -> dict:
    """Analyse a variant's final model on the held-out documents of its corpus (all variants of a
    comparison share corpus and seed, so the same documents), as it was trained (its global tokens)."""
    if progress:
        print(f"  {name}: attention analysis", file=sys.stderr)
    res = analyze_saved(Path(vdir) / "model", data=spec["data"], max_docs=spec["max_docs"], seq_len=spec["seq_len"],
                        window=spec["window"])
    write_analysis({name: res}, Path(vdir) / "analysis")
    return res


def overall(res: dict, metric: str) -> float | None:
    """A metric averaged over the layers of one analysis (None where no layer has it)."""
    vals = [layer["mean"][metric] for layer in res["layers"] if layer["mean"][metric] is not None]
    return sum(vals) / len(vals) if vals else None


def compare_lines(results: list[dict], out: Path) -> list[str]:
    """The report's section: each variant's pretraining loss, downstream scores and where its attention
    goes, side by side, with the joint plots in ``out/analysis``."""
    done = [r for r in results if r.get("analysis")]
    if not done:
        return []
    paths = write_analysis({r["variant"]: r["analysis"] for r in done}, Path(out) / "analysis")
    tasks = list(dict.fromkeys(t for r in done for t in (r.get("finetune") or {})))
    head = ["variant", "held-out MLM loss", "bits/token"] + [f"{t} {done[0]['finetune'][t]['metric']} (test, 95% CI)"
                                                            for t in tasks if t in (done[0].get("finetune") or {})] \
        + ["mass on headings", "mass on global", "mass beyond window", "mean distance", "entropy"]
    lines = ["## Attention analysis (where the mass goes)", "",
             f"Final models on {done[0]['analysis']['documents']} documents ({done[0]['analysis'].get('data', '')}), "
             f"the first {done[0]['analysis'].get('seq_len')} tokens of each; heading tokens are "
             f"{100 * done[0]['analysis']['heading_fraction']:.1f}% of the tokens. Means over layers, heads and "
             "query tokens; per layer and head in `analysis/analysis.md`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in done:
        a, ev = r["analysis"], r.get("eval") or {}
        loss = ev.get("loss")
        cells = [r["variant"], _fmt(loss), _fmt(None if loss is None else loss / math.log(2))]
        for t in tasks:
            ft = (r.get("finetune") or {}).get(t)
            if ft is None:
                cells.append("n/a")
                continue
            m, te = ft["metric"], ft["test"]
            lo, hi = te.get(f"{m}_ci", [None, None])
            cells.append(f"{te[m]:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{te[m]:.3f}")
        cells += [_fmt(overall(a, m)) for m in ("heading_share", "global_share", "beyond_window", "mean_distance",
                                                 "entropy")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per layer (mass on headings / mass beyond the window):", "",
              "| variant | " + " | ".join(f"layer {layer['layer']}" for layer in done[0]["analysis"]["layers"]) + " |",
              "|" + "---|" * (1 + len(done[0]["analysis"]["layers"]))]
    for r in done:
        lines.append(f"| {r['variant']} | " + " | ".join(
            f"{_fmt(layer['mean']['heading_share'])} / {_fmt(layer['mean']['beyond_window'])}"
            for layer in r["analysis"]["layers"]) + " |")
    lines += ["", f"![attention heatmaps](analysis/{paths['heatmaps'].name})",
              f"![attention distance](analysis/{paths['distance'].name})"]
    return lines
