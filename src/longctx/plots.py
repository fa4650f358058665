"""Figures: matplotlib on its Agg backend (no display; safe in worker processes) and the two kinds
of figure the reports draw, lines over a shared x axis and bar panels, and a heatmap (RULER's accuracy by
needle depth and context length). Every figure is saved atomically (a reader never sees half a PNG) and
closed."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported on first use (a CLI without plots never pays
    for matplotlib)."""
    import matplotlib  # here: slow to import, only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Lay out, write ``path`` atomically (a ``.tmp-`` file renamed onto it) and close ``fig``."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return path


def sci(value: float) -> str:
    """A tick label a reader takes in at once: 6.9e10, 1.3e11, 0.002, 300 (two significant digits)."""
    text = f"{value:.2g}"
    if 1e-3 <= abs(value) < 1e4:
        return f"{float(text):g}"
    if "e" not in text:
        return text
    mantissa, exp = text.split("e")
    return f"{mantissa}e{int(exp)}"


def data_ticks(xs: Sequence[float], log: bool, min_gap: float = 0.08) -> list[float]:
    """The x values of the data to put ticks at, ascending, leaving out any closer than ``min_gap`` of the
    axis span (in log space on a log axis) to the tick before it, so labels do not overlap."""

    values = sorted({float(x) for x in xs if x is not None and (x > 0 or not log)})
    if not values:
        return []
    at = (lambda v: math.log(v)) if log else (lambda v: v)
    span = (at(values[-1]) - at(values[0])) or 1.0
    kept = [values[0]]
    for v in values[1:]:
        if at(v) - at(kept[-1]) >= min_gap * span:
            kept.append(v)
    return kept


def line_figure(path: str | os.PathLike, series: Sequence[dict], xlabel: str, ylabel: str, *,
                title: str | None = None, log_x: int | None = None, log_y: bool = False,
                xticks: Sequence[int] | None = None, xticks_at_data: bool = False, figsize=(6.5, 4),
                legend_size: int = 8, dpi: int = 100) -> Path:
    """One line per entry of ``series``: ``{"x", "y", "label"}`` and optionally ``"style"`` (a format
    string such as ``"o--"``), ``"alpha"``, ``"color"``, ``"yerr"`` (error bars: one list of half-widths,
    or (below, above) lists). ``log_x``: the base of a log x axis. ``xticks_at_data``: x ticks at the data's
    x values, labelled in plain scientific notation (``6.9e10``; a log axis's own ticks can be one "2^36"
    when the data span less than one power)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    for s in series:
        kw = {k: s[k] for k in ("alpha", "color", "linewidth") if k in s}
        if s.get("yerr") is not None:
            ax.errorbar(s["x"], s["y"], yerr=s["yerr"], fmt=s.get("style") or "-", capsize=3, label=s.get("label"), **kw)
        else:
            ax.plot(s["x"], s["y"], *([s["style"]] if s.get("style") else []), label=s.get("label"), **kw)
    if log_x:
        ax.set_xscale("log", base=log_x)
    if log_y:
        ax.set_yscale("log")
    if xticks is not None:
        ax.set_xticks(list(xticks), [str(n) for n in xticks])
    elif xticks_at_data:
        from matplotlib.ticker import NullLocator
        ticks = data_ticks([x for s in series for x in s["x"]], log=bool(log_x))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(ticks, [sci(t) for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if any(s.get("label") for s in series):
        ax.legend(fontsize=legend_size)
    ax.grid(True, which="both" if log_x or log_y else "major", alpha=0.3)
    return save(fig, path, dpi)


def bar_figure(path: str | os.PathLike, names: Sequence[str], panels: Sequence[tuple[Sequence[float], str, str]], *,
               figsize=None, dpi: int = 100) -> Path:
    """One bar panel per ``(values, ylabel, color)``, side by side, all over the same ``names``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=figsize or (4.5 * len(panels), 3.5), squeeze=False)
    for ax, (values, ylabel, color) in zip(axes[0], panels):
        ax.bar(list(names), list(values), color=color)
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=30)
    return save(fig, path, dpi)


def heatmap_figure(path: str | os.PathLike, values, row_labels: Sequence[str], col_labels: Sequence[str],
                   xlabel: str, ylabel: str, *, title: str | None = None, vmin: float = 0.0, vmax: float = 1.0,
                   figsize=None, dpi: int = 100) -> Path:
    """A matrix ``values`` (rows x columns) as coloured cells, each annotated with its value; a NaN cell
    (no data) is left blank."""

    plt = pyplot()
    m = np.asarray(values, float)
    fig, ax = plt.subplots(figsize=figsize or (1.2 * m.shape[1] + 2.5, 0.6 * m.shape[0] + 1.8))
    im = ax.imshow(np.ma.masked_invalid(m), vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
    for (r, c), v in np.ndenumerate(m):
        if np.isfinite(v):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if v > vmin + 0.6 * (vmax - vmin) else "white")
    ax.set_xticks(range(m.shape[1]), list(col_labels))
    ax.set_yticks(range(m.shape[0]), list(row_labels))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return save(fig, path, dpi)


def ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as Adam's moments, and TensorBoard's smoothing
    without the warm start): point t is sum_k (1-beta) beta^(t-k) v_k / (1 - beta^(t+1)), so the first
    point is the first value and early points are not pulled toward zero."""
    out, m = [], 0.0
    for t, v in enumerate(values):
        m = beta * m + (1 - beta) * v
        out.append(m / (1 - beta ** (t + 1)))
    return out
