"""Progress of long jobs (corpus building, tokenising, training, finetuning, benchmarks, conversion):
a tqdm bar with rate and ETA on a terminal, plain lines with the same numbers when the output is not
a terminal (a log file, a pipe, CI), where a redrawn bar would be one endless line of ``\\r``.

    with Progress(total=len(docs), desc="tokenising", unit="doc") as bar:
        for doc in docs:
            ...
            bar.update(1)
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time

# seconds between two plain lines of a long job when the output is not a terminal (a log file, a pipe), so
# that a file shows the run moving between its logged steps (LONGCTX_PROGRESS_INTERVAL overrides it)
PLAIN_INTERVAL = 30.0
# a setup phase that lasts longer than this says so (before it ends) and how long it took; shorter ones stay
# silent, so a short run prints no more than before
PHASE_AFTER = 2.0


def plain_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("LONGCTX_PROGRESS_INTERVAL", PLAIN_INTERVAL)))
    except ValueError:
        return PLAIN_INTERVAL


@contextlib.contextmanager
def phase(desc: str, *, enabled: bool = True, stream=None, after: float | None = None):
    """A step of a job's setup (loading the corpus, the tokenizer, building the model, the first step):
    once it has run ``after`` seconds, ``desc ...`` is printed (while it runs, from a timer thread), and at
    its end ``desc: done in 12s``; a phase that ends sooner prints nothing."""
    if not enabled:
        yield
        return
    stream = stream if stream is not None else sys.stderr
    after = PHASE_AFTER if after is None else after
    start = time.monotonic()
    lock, state = threading.Lock(), {"done": False, "said": False}

    def announce():
        with lock:
            if not state["done"]:
                state["said"] = True
                print(f"{desc} ...", file=stream, flush=True)

    timer = threading.Timer(after, announce)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            state["done"] = True
            said = state["said"]
        took = time.monotonic() - start
        if said or took >= after:
            print(f"{desc}: done in {format_seconds(took)}", file=stream, flush=True)


def format_seconds(s: float) -> str:
    """``1h02m03s`` / ``4m05s`` / ``7s``; ``?`` when unknown."""
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
    """Counts work done out of ``total`` (None: unknown, no ETA).

    On a terminal (``stream.isatty()``) a tqdm bar; otherwise one line per ``interval`` seconds (None:
    only when asked with ``update(..., log=True)``), and one at the end:
    ``desc: n/total unit | rate unit/s | elapsed | ETA | postfix``. ``enabled=False`` shows nothing.
    ``initial``: work done before this process started (a resumed run); the rate counts only this
    process's work. ``delay``: seconds before anything is shown (a job that ends sooner stays silent)."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
                 stream=None, interval: float | None = 10.0, initial: int = 0, delay: float = 0.0):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval, self.n, self.initial, self.delay = interval, initial, initial, delay
        self.postfix: dict = {}
        self.start = self.last_line = time.monotonic()
        self.bar = None
        self.closed = False
        if enabled and _isatty(self.stream):
            from tqdm import tqdm  # here: only for a terminal's bar (the CLI parser imports this module)
            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream, dynamic_ncols=True,
                            smoothing=0.1, delay=delay)

    def restart_clock(self) -> None:
        """Count rate, elapsed time and ETA from now (after a setup that is not the work counted, such as
        a kernel build: otherwise the first lines would report its minute as slow steps)."""
        self.start = self.last_line = time.monotonic()
        if self.bar is not None:
            self.bar.start_t = self.bar.last_print_t = self.bar._time()

    # ---- counting ----
    def update(self, n: int = 1, log: bool = False, **postfix) -> None:
        """``n`` more done; ``postfix``: values shown after the rate (loss=..., lr=...); ``log``: write a
        plain line now (on a terminal, the postfix is shown on the bar)."""
        self.n += n
        if postfix:
            self.postfix = postfix
        if not self.enabled:
            return
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.start < self.delay:
            return
        due = self.interval is not None and now - self.last_line >= self.interval
        if log or due or (self.total is not None and self.n >= self.total):
            self._line(now)

    def write(self, text: str) -> None:
        """A message that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif (self.enabled and self.last_line < self.start + 1e-9 and self.n > self.initial
              and time.monotonic() - self.start >= self.delay):
            self._line(time.monotonic())  # a job too short for a timed line still says what it did

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- plain lines ----
    def rate(self, now: float | None = None) -> float:
        """Units per second over this process's work."""
        elapsed = (now or time.monotonic()) - self.start
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float:
        r = self.rate(now)
        if self.total is None or r <= 0:
            return float("nan")
        return max(self.total - self.n, 0) / r

    def _postfix(self) -> str:
        return " | ".join(f"{k} {v}" for k, v in self.postfix.items())

    def _line(self, now: float) -> None:
        self.last_line = now
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: {count} {self.unit}" if self.desc else f"{count} {self.unit}",
                 f"{self.rate(now):,.2f} {self.unit}/s", f"elapsed {format_seconds(now - self.start)}",
                 f"ETA {format_seconds(self.eta(now))}"]
        if self.postfix:
            parts.append(self._postfix())
        print(" | ".join(parts), file=self.stream, flush=True)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
