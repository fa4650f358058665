"""The shared helpers: atomic writes (longctx.io), progress (longctx.progress), figures (longctx.plots)."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from longctx import io
from longctx.errors import LongctxError
from longctx.plots import ema

# --- io ----------------------------------------------------------------------------------------------


def test_write_text_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    io.write_json(p, {"x": 1})
    assert json.loads(p.read_text()) == {"x": 1}

    def broken(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        io.write_text(p, "new")
    assert json.loads(p.read_text()) == {"x": 1}  # the old content, whole
    assert [q.name for q in tmp_path.iterdir()] == ["a.json"]  # no temporary left


def test_publish_dir(tmp_path):
    final = tmp_path / "out"
    with io.publish_dir(final) as tmp:
        (tmp / "f").write_text("1")
        assert not final.exists()  # invisible until the block ends
    assert (final / "f").read_text() == "1"
    with pytest.raises(RuntimeError), io.publish_dir(final) as tmp:  # an error: the old folder stays
        (tmp / "f").write_text("2")
        raise RuntimeError
    assert (final / "f").read_text() == "1"
    with io.publish_dir(final) as tmp:  # success: replaced
        (tmp / "g").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["g"]
    with io.publish_dir(final, replace=False) as tmp:  # a cache key published first is kept
        (tmp / "h").write_text("4")
    assert sorted(p.name for p in final.iterdir()) == ["g"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_jsonl_skips_torn_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n{"step": 3, "lo')
    assert io.read_jsonl(p) == [{"step": 1}, {"step": 2}]
    assert io.read_jsonl(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize("text,why", [("a: [1\n", "not valid YAML"), ("- 1\n- 2\n", "mapping of keys"),
                                      (b"\xff\xfe", "not UTF-8")])
def test_load_yaml_errors_are_one_sentence(tmp_path, text, why):
    p = tmp_path / "c.yaml"
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    with pytest.raises(LongctxError, match=why) as e:
        io.load_yaml(p, "benchmark config")
    assert "\n" not in str(e.value) and str(e.value).startswith("benchmark config")
    with pytest.raises(LongctxError, match="does not exist"):
        io.load_yaml(tmp_path / "none.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert io.load_yaml(tmp_path / "empty.yaml") == {}


def test_ema_is_the_bias_corrected_average():
    v = [4.0, 2.0, 7.0, 1.0]
    beta = 0.8
    for t, got in enumerate(ema(v, beta)):
        w = [(1 - beta) * beta ** (t - k) for k in range(t + 1)]
        assert got == pytest.approx(sum(wk * vk for wk, vk in zip(w, v)) / sum(w))
    assert ema(v, beta)[0] == v[0]


# --- progress ----------------------------------------------------------------------------------------
JOB = """
import time
from longctx.progress import Progress
with Progress(total=8, desc="work", unit="doc", interval=0) as bar:
    for i in range(8):
        time.sleep(0.01)
        bar.update(1, loss=f"{i:.1f}")
"""


def _run_job_on_pty() -> str:
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-c", JOB], stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    out = b""
    while True:
        r, _, _ = select.select([parent], [], [], 30)
        if not r:
            break
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=30)
    os.close(parent)
    return out.decode(errors="replace")


def test_progress_on_a_terminal_is_a_bar_with_rate_and_eta():
    out = _run_job_on_pty()
    assert "\r" in out  # redrawn in place
    last = [part for part in out.replace("\r\n", "\n").split("\r") if part.strip()][-1]  # the final redraw
    assert "work: 100%" in last and "8/8" in last
    assert "doc/s" in last  # the rate
    assert "<00:00" in last  # elapsed<remaining: tqdm's ETA
    assert "loss 7.0" in last


def test_progress_into_a_pipe_is_plain_lines():
    res = subprocess.run([sys.executable, "-c", JOB], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert "\r" not in res.stderr and len(lines) == 8  # interval=0: a line per update
    for i, line in enumerate(lines, 1):
        fields = line.split(" | ")
        assert fields[0] == f"work: {i}/8 doc"
        rate = float(fields[1].removesuffix(" doc/s").replace(",", ""))
        assert 0 < rate < 1000  # 10 ms a doc: at most 100/s
        assert fields[3].startswith("ETA ") and fields[4] == f"loss {i - 1:.1f}"
    assert lines[-1].split(" | ")[3] == "ETA 0s"


def test_progress_without_interval_prints_only_when_asked_and_at_the_end(capsys):
    from longctx.progress import Progress

    with Progress(total=5, desc="train", unit="step", interval=None, stream=sys.stdout) as bar:
        for i in range(5):
            bar.update(1, log=(i == 1))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["train: 2/5 step", "train: 5/5 step"]
    with Progress(total=5, enabled=False, stream=sys.stdout) as bar:
        bar.update(5)
    assert capsys.readouterr().out == ""


# --- plots -------------------------------------------------------------------------------------------


def test_compare_loss_plot_smooths_training_and_marks_held_out(tmp_path):
    """The default compare's loss plot: per variant an EMA of the training loss (its beta falls with the
    number of points: 1 - 5/points, at most 0.9) and the held-out points with their intervals, in one colour;
    raw per-step losses (which coincide across variants) are not drawn."""
    from longctx.experiments.report import _loss_series
    from longctx.train.trainer import plot_losses

    rows = {}
    for v, off in (("a", 0.0), ("b", 0.5)):
        rows[v] = [{"type": "train", "step": s, "loss": 5.0 - s / 10 + off + (0.3 if s % 2 else -0.3), "train_time": s}
                   for s in range(1, 11)] + [{"type": "eval", "step": 5, "loss": 4.6 + off, "train_time": 5.5},
                                             {"type": "eval", "step": 10, "loss": 4.1 + off, "train_time": 10.5,
                                              "loss_ci": [3.9 + off, 4.4 + off]}]
    series = _loss_series(rows, "step")
    assert [s["label"] for s in series] == ["a train (EMA 0.50)", "a held-out (95% interval)",
                                            "b train (EMA 0.50)", "b held-out (95% interval)"]
    raw = [r["loss"] for r in rows["a"] if r["type"] == "train"]
    assert series[0]["y"] == ema(raw, 0.5) and series[0]["x"] == list(range(1, 11))
    # error bars: the interval where one was measured, none where not
    assert series[1]["yerr"][0] == [0.0, pytest.approx(0.2)] and series[1]["yerr"][1] == [0.0, pytest.approx(0.3)]
    # a long run is smoothed at 0.9, a run of five points drawn raw
    long = {"a": [{"type": "train", "step": s, "loss": 1.0} for s in range(100)]}
    assert _loss_series(long, "step")[0]["label"] == "a train (EMA 0.90)"
    short = {"a": [{"type": "train", "step": s, "loss": float(s)} for s in range(5)]}
    assert _loss_series(short, "step")[0]["y"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    jumps = lambda ys: max(abs(a - b) for a, b in zip(ys, ys[1:]))  # noqa: E731
    assert jumps(series[0]["y"][3:]) < jumps(raw[3:]) / 2  # smoothed (past the first points)
    assert series[1]["x"] == [5, 10] and series[1]["y"] == [4.6, 4.1]
    assert series[0]["color"] == series[1]["color"] != series[2]["color"]
    assert _loss_series(rows, "train_time")[1]["x"] == [5.5, 10.5]
    png = plot_losses(rows["a"], tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]  # no temporary left


def test_progress_delay_keeps_short_jobs_silent(capsys):
    from longctx.progress import Progress

    with Progress(total=3, desc="tokenising", stream=sys.stdout, interval=0, delay=60) as bar:
        bar.update(3)
    assert capsys.readouterr().out == ""


def _tick_labels(monkeypatch):
    """Record each saved figure's axes' tick labels (drawn, as a reader sees them) before it is closed."""
    import longctx.plots as plots

    seen = []
    real = plots.save

    def save(fig, path, dpi=100):
        fig.canvas.draw()
        seen.append([([t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()],
                      ax.get_title()) for ax in fig.axes])
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "save", save)
    return seen


def test_attention_heatmaps_label_layers_and_heads_at_their_cells(tmp_path, monkeypatch):
    """Issue 30: with one layer the heatmaps' layer axis read -0.4, -0.2, 0.0, 0.2, 0.4 (imshow's ticks);
    now one tick per layer, named as analysis.md and the report name it (from 0), one per head."""
    from longctx.eval.analysis import METRICS, plot_analysis

    def res(layers, heads):
        return {"distance_bins": [0, 1, 2, 4], "layers": [{"layer": i, "heads": [
            {**{m: 0.1 * h + 0.01 * i for m in METRICS}, "distance_profile": [0.5, 0.3, 0.2]} for h in range(heads)]}
            for i in range(layers)]}

    seen = _tick_labels(monkeypatch)
    plot_analysis({"a": res(1, 4), "b": res(1, 4)}, tmp_path)
    heatmaps = [ax for ax in seen[0] if ax[2]]  # the colour bars have no title
    assert len(heatmaps) == 2 * len(METRICS)
    for x, y, _ in heatmaps:
        assert y == ["layer 0"] and x == ["0", "1", "2", "3"]
    seen.clear()
    plot_analysis({"a": res(3, 2)}, tmp_path)
    assert all(y == ["layer 0", "layer 1", "layer 2"] and x == ["0", "1"] for x, y, t in seen[0] if t)
    assert [t for _, _, t in seen[1]] == ["layer 0", "layer 1", "layer 2"]  # the distance plot: the same names


def test_score_vs_compute_ticks_are_the_runs_flops(tmp_path, monkeypatch):
    """Issue 30: FLOPs spanning less than a power of 2 showed one tick, "2^36", on the log x axis; now
    ticks at the runs' FLOPs in plain scientific notation (close ones thinned so labels do not overlap)."""
    from longctx.experiments import compute
    from longctx.plots import data_ticks, sci

    results = []
    for variant, flops in (("sliding", (7.0e10, 1.1e11)), ("blocks", (7.1e10, 1.12e11))):
        for budget, f in zip((1, 2), flops):
            results.append({"compute": {"variant": variant, "budget": budget}, "train_flops": f, "eval": {"loss": 5.0},
                            "finetune": {"qa": {"metric": "f1", "from_scratch": False,
                                                "test": {"f1": 0.3, "f1_ci": [0.25, 0.35]}}}})
    seen = _tick_labels(monkeypatch)
    (png,) = compute.plots(results, tmp_path)
    assert png.name == "qa_vs_compute.png"
    (x, _, _), = seen[0]
    assert x == ["7e10", "1.1e11"]
    assert sci(6.9e10) == "6.9e10" and sci(1.31e11) == "1.3e11" and sci(300.0) == "300"
    assert data_ticks([1.0, 1.01, 2.0, 4.0], log=True) == [1.0, 2.0, 4.0]


def test_a_setup_phase_says_itself_only_when_it_takes_a_while(capsys):
    """Issue 30: the first ~40 s of a run (corpus, tokenizer, model, first step) printed nothing into a
    file. A phase that runs past its threshold says so while it runs, and how long it took; a short one
    prints nothing."""
    import time

    from longctx.progress import phase

    with phase("loading the corpus", stream=sys.stdout, after=0.05):
        time.sleep(0.3)
        said_while_running = capsys.readouterr().out
    assert said_while_running == "loading the corpus ...\n"  # before the phase ended
    assert capsys.readouterr().out.startswith("loading the corpus: done in ")
    with phase("quick", stream=sys.stdout, after=5.0):
        pass
    with phase("off", stream=sys.stdout, after=0.0, enabled=False):
        time.sleep(0.01)
    time.sleep(0.1)
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_training_into_a_file_prints_between_log_steps_and_its_setup(tmp_path, monkeypatch, capsys):
    """Issue 30: with output not a terminal the trainer printed a line only every train.log_every steps
    (minutes apart at long lengths); now also one at least every LONGCTX_PROGRESS_INTERVAL seconds (30 by
    default; 0 here: after every step), and a line for each setup phase that lasts (threshold 0 here)."""
    import longctx.progress as progress
    from longctx.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 31}" for j in range(200)) + "\n")
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LONGCTX_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr(progress, "PHASE_AFTER", 0.0)
    assert main(["pretrain", "--out", str(tmp_path / "run"), f"data.corpus={corpus}", "data.tokenizer=bytes",
                 "data.seq_len=32", "model.hidden_size=16", "model.num_hidden_layers=1", "model.num_attention_heads=2",
                 "model.window=4", "model.max_position_embeddings=32", "train.steps=4", "train.log_every=100",
                 "train.batch_size=1", "train.eval_batches=1", "train.warmup_steps=1"]) == 0
    err = capsys.readouterr().err
    steps = [line.split(" | ")[0] for line in err.splitlines() if line.startswith("train: ")]
    assert steps == [f"train: {i}/4 step" for i in range(1, 5)]  # log_every=100: before, only 4/4
    rate = [line for line in err.splitlines() if line.startswith("train: 2/4")][0]
    assert " step/s | elapsed " in rate and "ETA " in rate
    for what in ("loading the corpus", "loading the tokenizer", "preparing the data", "building the model",
                 "the first training step"):
        assert f"{what}" in err and any(line.startswith(what) and ": done in " in line for line in err.splitlines()), what


def test_progress_restart_clock_leaves_setup_out_of_the_rate(capsys):
    import time

    from longctx.progress import Progress

    with Progress(total=4, desc="train", unit="step", interval=None, stream=sys.stdout) as bar:
        time.sleep(0.5)  # a kernel build before the first step
        bar.restart_clock()
        for _ in range(4):
            time.sleep(0.01)
            bar.update(1)
    (line,) = capsys.readouterr().out.splitlines()
    assert float(line.split(" | ")[1].removesuffix(" step/s")) > 20  # 4 steps in ~0.04 s, not in 0.54 s
