"""Storage writes that are being retried, seen by the driver while they happen.

An actor that waits out an outage of its storage (an S3 endpoint that refuses connections, minutes
of throttling) hands back no rows meanwhile, so its rows cannot carry the news. Each actor's writers
tell one small Ray actor (`RetryBoard`) instead; the driver reads it for every progress line, says
once when writes start and stop being retried, and records the counts in run.json.
"""
from __future__ import annotations

import threading
import time


class RetryNotes:
    """Who is retrying a write now, since when and why; and the totals of the run."""

    def __init__(self):
        self.waiting: dict[str, dict] = {}  # writer -> {"since": epoch seconds, "error": text}
        self.retries = 0
        self.outages = 0  # times the writers went from none waiting to some
        self.longest_s = 0.0
        self.last_error: str | None = None

    def retrying(self, writer: str, error: str, waited_s: float) -> None:
        self.retries += 1
        self.last_error = error
        if not self.waiting:
            self.outages += 1
        since = self.waiting.get(writer, {}).get("since", time.time() - waited_s)
        self.waiting[writer] = {"since": since, "error": error}

    def recovered(self, writer: str, waited_s: float) -> None:
        self.waiting.pop(writer, None)
        self.longest_s = max(self.longest_s, waited_s)

    def snapshot(self) -> dict:
        now = time.time()
        waiting = [now - w["since"] for w in self.waiting.values()]
        return {"writers_waiting": len(waiting), "waiting_s": round(max(waiting), 1) if waiting else 0.0,
                "error": next((w["error"] for w in self.waiting.values()), None), "retries": self.retries,
                "outages": self.outages, "longest_s": round(self.longest_s, 1), "last_error": self.last_error}


def new_board(name: str):
    """A RetryNotes as a Ray actor of its own (no CPU), that every model actor can reach by `name`.

    The model actors are given the name, not the handle: a handle in a restartable actor's constructor
    arguments makes Ray print an error line on the driver (ray-project/ray#53727: arguments in the
    object store may be gone when the actor restarts; the board lives as long as the run)."""
    import ray

    return ray.remote(num_cpus=0)(RetryNotes).options(name=name).remote()


def board_by_name(name: str):
    import ray

    return ray.get_actor(name)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


class WriteWatcher:
    """The `watcher` a storage hands to `call_with_retries`: passes each writer's retries to the board.

    A note is sent without waiting for an answer, and at most one a second per writer while it keeps
    failing: the board needs to know that a writer waits, not every attempt.
    """

    def __init__(self, board, who: str):
        self.board, self.who = board, who
        self._last_note: dict[str, float] = {}

    def _writer(self) -> str:
        return f"{self.who}/{threading.current_thread().name}"

    def retrying(self, exc: BaseException, waited_s: float) -> None:
        writer = self._writer()
        if time.monotonic() - self._last_note.get(writer, -1e9) < 1.0:
            return
        self._last_note[writer] = time.monotonic()
        self.board.retrying.remote(writer, _describe(exc), waited_s)

    def recovered(self, waited_s: float) -> None:
        writer = self._writer()
        self._last_note.pop(writer, None)
        self.board.recovered.remote(writer, waited_s)


class RetryWatch:
    """The driver's view: a progress-line note while writes wait, a line when an outage starts and ends."""

    def __init__(self, board, limit_s: float, echo):
        self.board, self.limit_s, self.echo = board, limit_s, echo
        self._waiting = False
        self._last: dict = {}
        self._lock = threading.Lock()  # the progress heartbeat and the rows loop both ask

    def status(self) -> str:
        """For the progress line: '' while every write goes through."""
        import ray

        with self._lock:
            try:
                self._last = ray.get(self.board.snapshot.remote(), timeout=5)
            except Exception:  # noqa: BLE001 (a progress note is not worth a failed run)
                return ""
            waiting = self._last["writers_waiting"] > 0
            if waiting and not self._waiting:
                self.echo(f"storage: writes are failing ({self._last['error']}); each is retried with backoff for "
                          f"up to {self.limit_s:g}s (--storage-retry-s) before its image becomes an error row")
            elif self._waiting and not waiting:
                self.echo(f"storage: writes go through again (the longest waited {self._last['longest_s']:g}s)")
            self._waiting = waiting
            return f"writes retrying for {self._last['waiting_s']:.0f}s" if waiting else ""

    def record(self) -> dict | None:
        """For run.json: the run's retries, or None when there were none."""
        self.status()
        if not self._last.get("retries"):
            return None
        return {key: self._last[key] for key in ("retries", "outages", "longest_s", "last_error")}
