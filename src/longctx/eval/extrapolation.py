"""Length extrapolation of a causal LM, scoring the same tokens at every length (LeX's protocol).

Sun et al. (LeX) take the first T tokens of every evaluation document at least that long (T = 4,096
in the paper) and split them into chunks of the length being tested, so the set of scored tokens is
the same at every length and the only thing that changes is how much context each token has. Here:

- every evaluation document contributes its first ``T + 1`` tokens ``x[0..T]``; the targets are
  ``x[1..T]`` (T tokens: the first token has nothing to be predicted from), each scored exactly once;
- at length n the chunks are the inputs ``x[jn : jn+n]`` predicting ``x[jn+1 : jn+n+1]``: every chunk
  is scored fully, the first target of a chunk sees one token of context and the last one n;
- ``stride=S`` (sliding evaluation) instead scores ``x[1..n]`` from the first window, then slides the
  window by S and scores only its last S targets, so every target after the first window sees at
  least ``n - S + 1`` tokens of context.

Either way the scored positions are ``{(doc, t) : 1 <= t <= T}`` at every length (``score_length``
returns the per-position losses so tests check the positions themselves, not a count).

Documents: the held-out documents with at least ``T + 1`` tokens, in order (at most ``max_docs``). A
corpus with fewer than two such documents (a single text8/enwik8 dev file, or short documents) is read
as its token stream cut into consecutive pieces of ``T + 1`` tokens instead, and the result says so
(``units``). The 95% interval is a seeded bootstrap over documents of the mean per-token loss,
reported on the perplexity (and bits) scale.

Blockwise causal attention (LeX, inference only): blocks of ``training_length // 2``, so no query sees a
span longer than the training length (``blockwise_block``).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longctx.data.packing import prepare_data
from longctx.data.tokenizer import ByteTokenizer
from longctx.errors import LongctxError
from longctx.eval.resolution import model_resolution
from longctx.io import write_json
from longctx.models import LongctxForCausalLM, LongctxForMaskedLM
from longctx.models.loading import load_longctx_model

LEX_TOKENS = 4096  # LeX scores the first 4k tokens of each document


@dataclass(frozen=True)
class Window:
    """Input tokens ``x[start : stop - 1]`` of a document, scoring the targets ``x[first : stop]``."""

    start: int
    first: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - 1 - self.start


def windows(T: int, n: int, stride: int | None = None) -> list[Window]:
    """The windows that score targets 1..T once each with inputs of at most ``n`` tokens: disjoint
    chunks (``stride=None``) or a window sliding by ``stride`` (each scoring its last ``stride``)."""
    if n < 1 or T < 1:
        raise LongctxError(f"length {n} and tokens {T} must be positive")
    if stride is None:
        return [Window(j, j + 1, min(j + n, T) + 1) for j in range(0, T, n)]
    if not 1 <= stride <= n:
        raise LongctxError(f"--stride {stride} must be between 1 and the length {n}")
    out = [Window(0, 1, min(n, T) + 1)]
    while out[-1].stop <= T:
        first = out[-1].stop
        stop = min(first + stride, T + 1)
        out.append(Window(max(0, stop - 1 - n), first, stop))
    return out


def blockwise_block(training_length: int) -> int:
    """LeX's block size for blockwise causal attention: half the training length, so a query sees its
    own block and the previous one, never more than ``training_length`` tokens."""
    if training_length < 2:
        raise LongctxError(f"training length {training_length} is too short for blockwise attention")
    return training_length // 2


def set_blockwise(model, block: int | None) -> None:
    """Give every layer of a causal longctx model blockwise causal attention of ``block`` (None: leave)."""
    if block is None:
        return
    if block < 1:
        raise LongctxError(f"blockwise block size must be positive, got {block}")
    for blk in model.longctx.layers:
        blk.attention.set_attention({"type": "blockwise_causal", "block": int(block)})


def load_model(model_dir):
    """A saved longctx model in eval mode, never running code from its folder (the safe loader, which
    also refuses non-longctx folders, when present)."""
    try:
        pass
    except ImportError:
        causal = json.loads((Path(model_dir) / "config.json").read_text()).get("causal")
        cls = LongctxForCausalLM if causal else LongctxForMaskedLM
        model = cls.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True).eval()
    else:
        model = load_longctx_model(model_dir)
    return model


def evaluation_documents(stream, T: int, max_docs: int | None = None) -> tuple[np.ndarray, str]:
    """(D, T+1) token ids: the first T+1 tokens of each document of ``stream`` (a TokenStream) with at
    least that many, or consecutive pieces of the stream when fewer than two documents are that long;
    and the unit's name ("documents" or "stream pieces")."""
    ids, starts = np.asarray(stream.ids), np.asarray(stream.doc_starts)
    ends = np.append(starts[1:], len(ids)) - 1  # each document ends with its separator: leave it out
    docs = [ids[a:a + T + 1] for a, b in zip(starts, ends) if b - a >= T + 1]
    unit = "documents"
    if len(docs) < 2:
        docs = [ids[a:a + T + 1] for a in range(0, len(ids) - T, T + 1)]
        unit = "stream pieces"
    docs = docs[:max_docs] if max_docs else docs
    return np.stack(docs).astype(np.int64) if docs else np.zeros((0, T + 1), np.int64), unit


def _max_length(model) -> int | None:
    """The longest input the model's positions can take (learned tables end; the rest do not)."""
    cfg = model.config
    return cfg.max_position_embeddings if cfg.position == "learned" else None


@torch.no_grad()
def score_length(model, docs: np.ndarray, n: int, stride: int | None = None, batch_size: int = 8) -> torch.Tensor:
    """Per-token loss (nats) of ``model`` on ``docs`` (D, T+1) at length ``n``: (D, T+1) float64, NaN
    where nothing was scored (position 0)."""
    D, T = docs.shape[0], docs.shape[1] - 1
    device = next(model.parameters()).device
    x = torch.from_numpy(docs)
    nll = torch.full((D, T + 1), float("nan"), dtype=torch.float64)
    items = [(d, w) for w in windows(T, n, stride) for d in range(D)]
    items.sort(key=lambda it: it[1].length)  # equal input lengths share a batch
    i = 0
    while i < len(items):
        L = items[i][1].length
        group = [it for it in items[i:i + batch_size] if it[1].length == L]
        i += len(group)
        inp = torch.stack([x[d, w.start:w.start + L] for d, w in group]).to(device)  # (b, L)
        logp = torch.log_softmax(model(inp).logits.float(), -1)  # (b, L, V)
        for row, (d, w) in enumerate(group):
            t = torch.arange(w.first, w.stop)                      # targets (document positions)
            lp = logp[row, t - 1 - w.start].gather(-1, x[d, t].to(device)[:, None])[:, 0]
            if not torch.isnan(nll[d, t]).all():
                raise AssertionError(f"position scored twice at length {n}")  # windows() guarantees it
            nll[d, t] = -lp.double().cpu()
    return nll


def interval95(per_doc: np.ndarray, seed: int = 0, draws: int = 2000) -> tuple[float, float] | None:
    """95% bootstrap interval of the mean of ``per_doc`` (resampling documents); None for one document."""
    if len(per_doc) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = per_doc[rng.integers(0, len(per_doc), (draws, len(per_doc)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summarize(nll: torch.Tensor, n: int, bits_per_char: bool) -> dict:
    """One length's row: loss, perplexity and its 95% interval over documents (bits per character for
    byte-level tokens, where one token is one byte: one character of ASCII text)."""
    per_doc = torch.nanmean(nll, 1).numpy()  # every document has the same T scored tokens
    loss = float(per_doc.mean())
    ci = interval95(per_doc)
    row = {"length": n, "loss": loss, "perplexity": math.exp(loss),
           "perplexity_ci95": [math.exp(ci[0]), math.exp(ci[1])] if ci else None,
           "scored_tokens": int((~torch.isnan(nll)).sum()), "documents": len(per_doc),
           "per_example": per_doc.tolist()}  # per document, in order: lengths and models pair on them
    if bits_per_char:
        row["bits_per_char"] = loss / math.log(2)
        row["bits_per_char_ci95"] = [ci[0] / math.log(2), ci[1] / math.log(2)] if ci else None
    return row


def extrapolation(model, stream, lengths: list[int], *, tokens: int | None = None, stride: int | None = None,
                  blockwise: int | None = None, resolution: bool = False, bits_per_char: bool = False,
                  max_docs: int | None = 64, batch_size: int = 8, progress=None) -> dict:
    """Evaluate a causal longctx ``model`` at each length on the held-out ``stream`` (LeX's protocol,
    see the module doc); ``blockwise``: evaluate with blockwise causal attention of that block size.
    Returns {tokens, units, documents, stride, blockwise, rows: [per length]}; a length beyond a
    learned position table gets a row with ``skipped`` (the reason) instead of numbers."""
    lengths = sorted(set(int(n) for n in lengths))
    if not lengths or lengths[0] < 1:
        raise LongctxError(f"lengths must be positive integers, got {lengths}")
    T = tokens or max(LEX_TOKENS, lengths[-1])
    docs, unit = evaluation_documents(stream, T, max_docs)
    if tokens is None and len(docs) < 2 and T > lengths[-1]:
        # too little held-out text for 4k tokens twice: score the largest length tested instead
        T = lengths[-1]
        docs, unit = evaluation_documents(stream, T, max_docs)
    if len(docs) == 0:
        raise LongctxError(f"the held-out text has {len(stream.ids)} tokens, fewer than the {T + 1} needed to "
                           f"score {T} tokens; evaluate shorter lengths or give --tokens a smaller value")
    set_blockwise(model, blockwise)
    limit = _max_length(model)
    rows = []
    for n in lengths:
        if limit is not None and n > limit:
            rows.append({"length": n, "skipped": f"learned positions end at {limit}"})
            continue
        row = summarize(score_length(model, docs, n, stride, batch_size), n, bits_per_char)
        if resolution:
            res = model_resolution(model, torch.from_numpy(docs[:2, :n]))  # the first chunk of two documents
            row["attention_resolution"] = sum(res) / len(res)
            row["attention_resolution_by_layer"] = res
        rows.append(row)
        if progress:
            progress(row)
    return {"tokens": T, "units": unit, "documents": int(docs.shape[0]), "stride": stride,
            "blockwise": blockwise, "rows": rows}


def format_row(row: dict) -> str:
    """One printed line per length."""
    if "skipped" in row:
        return f"length {row['length']:>7}: n/a ({row['skipped']})"
    ci = row.get("perplexity_ci95")
    text = f"length {row['length']:>7}: loss {row['loss']:.4f}  perplexity {row['perplexity']:.2f}"
    if ci:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    if "bits_per_char" in row:
        text += f"  bpc {row['bits_per_char']:.3f}"
    if "attention_resolution" in row:
        text += f"  resolution {row['attention_resolution']:.4f}"
    return text


# -- in a comparison (`extrapolation:` section of a comparison config) -------------------------------
RELATIVE_POSITIONS = ("rope", "alibi", "xpos")  # blockwise causal attention applies to these (LeX)
SPEC_KEYS = {"multiples": None, "lengths": None, "tokens": None, "stride": None, "blockwise": True,
             "resolution": True, "max_docs": 64, "batch_size": 8}


def check_spec(spec) -> dict:
    """The ``extrapolation:`` section of a comparison config, with defaults: lengths as ``multiples`` of
    the training length (default 1, 2, 4, 8) or absolute ``lengths``; ``blockwise`` (also evaluate with
    blocks of half the training length, for relative positions); ``resolution``; ``tokens`` (T),
    ``stride``, ``max_docs``, ``batch_size``."""
    if not isinstance(spec, dict):
        raise LongctxError("extrapolation: must be a mapping, e.g. {multiples: [1, 2, 4, 8], blockwise: true}")
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise LongctxError(f"extrapolation has unknown keys {sorted(unknown)}; use {', '.join(SPEC_KEYS)}")
    out = {**SPEC_KEYS, **spec}
    if out["multiples"] is not None and out["lengths"] is not None:
        raise LongctxError("extrapolation: give either multiples (of the training length) or lengths, not both")
    for key in ("multiples", "lengths"):
        v = out[key]
        if v is not None and (not isinstance(v, list) or not v or not all(isinstance(x, int) and x > 0 for x in v)):
            raise LongctxError(f"extrapolation.{key} must be a list of positive integers, got {v!r}")
    if out["multiples"] is None and out["lengths"] is None:
        out["multiples"] = [1, 2, 4, 8]
    return out


def evaluate_variant(cfg: dict, vdir, spec: dict, progress: bool = False) -> dict:
    """Extrapolation results of a comparison variant trained in ``vdir`` (written to
    ``vdir/extrapolation.json``, reused by a rerun): {training_length, tokens, ..., runs: {"plain":
    rows, "blockwise": rows (relative positions only)}}."""


    vdir = Path(vdir)
    done = vdir / "extrapolation.json"
    if done.exists():
        return json.loads(done.read_text())
    if cfg["objective"] != "clm":
        raise LongctxError("the extrapolation section needs causal LMs (objective: clm)")
    L = json.loads((vdir / "results.json").read_text()).get("seq_len") or cfg["data"]["seq_len"]
    lengths = spec["lengths"] or [m * L for m in spec["multiples"]]
    d = cfg["data"]
    tokenizer = str(vdir / "model") if (vdir / "model" / "tokenizer.json").exists() else d["tokenizer"]
    data = prepare_data(d["corpus"], tokenizer, d["valid_fraction"], cfg["seed"], d["text_field"])
    settings = {"plain": None}
    if spec["blockwise"] and cfg["model"].get("position") in RELATIVE_POSITIONS:
        settings["blockwise"] = blockwise_block(L)
    out = {"training_length": L, "position": cfg["model"].get("position"), "runs": {}}
    for name, block in settings.items():
        model = load_model(vdir / "model")
        show = (lambda row, name=name: print(f"  {name:>9} {format_row(row)}", file=sys.stderr)) if progress else None
        res = extrapolation(model, data.valid, lengths, tokens=spec["tokens"], stride=spec["stride"],
                            blockwise=block, resolution=spec["resolution"],
                            bits_per_char=isinstance(data.tokenizer, ByteTokenizer), max_docs=spec["max_docs"],
                            batch_size=spec["batch_size"], progress=show)
        out.update({k: res[k] for k in ("tokens", "units", "documents", "stride")})
        out["runs"][name] = {"blockwise": block, "rows": res["rows"]}
    write_json(done, out)
    return out
