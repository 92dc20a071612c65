"""Progress of a batch run: images done / total, images per second, ETA, errors so far.

A line is printed when the first rows arrive and then at most every `interval_s` as rows come in.
While nothing arrives (actors starting, a long part) a heartbeat says so every `interval_s`, so a
run is never silent for long.
"""
from __future__ import annotations

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
    ok: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    _last_report: float = field(default_factory=time.monotonic)
    _first_rows: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> int:
        return min(self.total, self.already_done + self.ok + self.errors)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.ok + self.errors) / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 else None

    def update(self, ok: int, errors: int) -> None:
        with self._lock:
            self.ok += ok
            self.errors += errors
            first = self._first_rows is None and ok + errors > 0
            if first:
                self._first_rows = time.monotonic()
            due = time.monotonic() - self._last_report >= self.interval_s
        if first or due:
            self.report()

    def line(self) -> str:
        percent = 100.0 * self.done / self.total if self.total else 100.0
        if self._first_rows is None:
            return (f"progress: {self.done}/{self.total} images ({percent:.1f}%) | waiting for the first part "
                    f"(actors load the model, compile kernels, capture graphs) | "
                    f"{format_duration(time.monotonic() - self.started)} elapsed")
        return (f"progress: {self.done}/{self.total} images ({percent:.1f}%) | {self.rate():.2f} images/s | "
                f"ETA {format_duration(self.eta_s())} | errors {self.errors}")

    def report(self) -> None:
        with self._lock:
            self._last_report = time.monotonic()
            text = self.line()
        self.echo(text)

    def start_heartbeat(self) -> None:
        """Say where the run stands whenever `interval_s` passes with nothing printed."""
        def beat():
            while not self._stop.wait(min(self.interval_s, 5.0)):
                if time.monotonic() - self._last_report >= self.interval_s:
                    self.report()

        threading.Thread(target=beat, name="twig-progress", daemon=True).start()

    def stop_heartbeat(self) -> None:
        self._stop.set()

    def summary(self) -> dict:
        elapsed = time.monotonic() - self.started
        return {"ok": self.ok, "errors": self.errors, "skipped_already_ok": self.already_done,
                "total": self.total, "elapsed_s": round(elapsed, 3), "images_per_s": round(self.rate(), 4)}
