"""Progress of a batch run: images done / total, images per second, ETA, errors so far."""
from __future__ import annotations

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
        self.ok += ok
        self.errors += errors
        if time.monotonic() - self._last_report >= self.interval_s:
            self.report()

    def line(self) -> str:
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (f"progress: {self.done}/{self.total} images ({percent:.1f}%) | {self.rate():.2f} images/s | "
                f"ETA {format_duration(self.eta_s())} | errors {self.errors}")

    def report(self) -> None:
        self._last_report = time.monotonic()
        self.echo(self.line())

    def summary(self) -> dict:
        elapsed = time.monotonic() - self.started
        return {"ok": self.ok, "errors": self.errors, "skipped_already_ok": self.already_done,
                "total": self.total, "elapsed_s": round(elapsed, 3), "images_per_s": round(self.rate(), 4)}
