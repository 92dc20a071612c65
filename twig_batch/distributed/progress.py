"""Progress of a batch run: images done / total, images per second, ETA, errors so far.

A line is printed when the first rows arrive and then at most every `interval_s` as rows come in.
While nothing arrives (actors starting, a long part) a heartbeat says so every `interval_s`, so a
run is never silent for long. On a terminal (`live`) a bar redrawn in place every second takes the
place of those lines; the run's other lines (`say`) are printed above it.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class Progress:
    """`total` counts (prompt, sample) pairs in the input; `already_done` were recorded ok before."""

    total: int
    already_done: int = 0
    echo: callable = print
    interval_s: float = 10.0
    live: bool = False
    status: callable = None  # a note on how the run fares (writes being retried), or ''; appended to the line
    # Images/s once the actors run (None until known; the batch job's is their first parts' rate, then
    # the steady one). The ETA uses it: the rate since the start still carries the actors' start, which
    # would put a first ETA of a long run hours off.
    steady_rate: callable = None
    drawing: callable = None  # how many actors have begun to draw (None: not known); said while no row has come
    ok: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    _last_report: float = field(default_factory=time.monotonic)
    _first_rows: float | None = None
    _latest_rows: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _bar_shown: bool = False

    @property
    def done(self) -> int:
        return min(self.total, self.already_done + self.ok + self.errors)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.ok + self.errors) / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds left: what is left at the running rate, counted down from the last rows' arrival
        (rows come back a part at a time: between two parts the ETA falls as the clock runs, where
        the same figure on every line would look like a stalled run)."""
        steady = self.steady_rate() if self.steady_rate is not None else None
        rate = steady if steady else self.rate()
        if rate <= 0:
            return None
        since = time.monotonic() - self._latest_rows if self._latest_rows is not None else 0.0
        return max(0.0, (self.total - self.done) / rate - since)

    def update(self, ok: int, errors: int) -> None:
        with self._lock:
            self.ok += ok
            self.errors += errors
            arrived = ok + errors > 0
            first = self._first_rows is None and arrived
            if arrived:
                self._latest_rows = time.monotonic()
            if first:
                self._first_rows = self._latest_rows
            due = time.monotonic() - self._last_report >= self.interval_s
        if first or due or self.live:
            self.report()

    def line(self, note: str = "") -> str:
        percent = 100.0 * self.done / self.total if self.total else 100.0
        note = f" | {note}" if note else ""
        if self._first_rows is None:
            return (f"progress: {self.done}/{self.total} images ({percent:.1f}%) | {self._waiting()} | "
                    f"{format_duration(time.monotonic() - self.started)} elapsed{note}")
        return (f"progress: {self.done}/{self.total} images ({percent:.1f}%) | {self.rate():.2f} images/s | "
                f"ETA {format_duration(self.eta_s())} | errors {self.errors}{note}")

    def _waiting(self) -> str:
        drawing = self.drawing() if self.drawing is not None else 0
        if drawing:
            return f"waiting for the first rows ({drawing} actor(s) drawing)"
        return "waiting for the first part (actors load the model, compile kernels, capture graphs)"

    def bar(self, width: int = 24, note: str = "") -> str:
        filled = int(width * self.done / self.total) if self.total else width
        if self._first_rows is None:
            line = (f"{self.done}/{self.total} images | waiting for the first part (actors start) | "
                    f"{format_duration(time.monotonic() - self.started)}")
        else:
            line = self.line(note).removeprefix("progress: ")
        return f"[{'#' * filled}{'.' * (width - filled)}] {line}"

    def report(self) -> None:
        note = self.status() if self.status is not None else ""  # outside the lock: it may say a line itself
        with self._lock:
            self._last_report = time.monotonic()
            if self.live:
                self._bar_shown = True
                sys.stdout.write("\r\x1b[K" + self.bar(note=note))
                sys.stdout.flush()
                return
            text = self.line(note)
        self.echo(text)

    def say(self, text: str) -> None:
        """A line of the run's own (an actor's start, a split part), above the live bar."""
        if not self.live:
            self.echo(text)
            return
        with self._lock:
            sys.stdout.write("\r\x1b[K" + text + "\n" + (self.bar() if self._bar_shown else ""))
            sys.stdout.flush()

    def start_heartbeat(self) -> None:
        """Say where the run stands whenever `interval_s` passes with nothing printed (on a
        terminal: redraw the bar every second)."""
        every = 1.0 if self.live else self.interval_s

        def beat():
            while not self._stop.wait(min(every, 5.0)):
                if time.monotonic() - self._last_report >= every:
                    self.report()

        threading.Thread(target=beat, name="twig-progress", daemon=True).start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self.live and self._bar_shown:  # the bar's last state stays on screen, the next line below it
            self.report()
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._bar_shown = False

    def summary(self) -> dict:
        elapsed = time.monotonic() - self.started
        return {"ok": self.ok, "errors": self.errors, "skipped_already_ok": self.already_done,
                "total": self.total, "elapsed_s": round(elapsed, 3), "images_per_s": round(self.rate(), 4)}
