"""The run's model actors: one Ray actor per GPU holding an `ImageGenerator`, fed calls by the driver.

Each actor has a lane on the driver (a thread) that hands it one call at a time, the next as soon as
the last is done, and passes its rows on part by part (Ray's streaming generator calls) to the run's
one queue of results. An actor gets its first call once it has loaded its model, so a slow starter
holds no work, and calls of one size go to whichever actor is free: no GPU waits while work is left.

Deaths. Ray restarts a dead actor (`max_restarts`) but does not replay its call (`max_task_retries=0`
here): a replay would draw again what had already come back, and, cut into parts differently (after
an out-of-memory split), lose rows. The driver sends the call again instead, with only the items the
dead actor had not handed back, to whichever actor is free first, at most `call_retries` times per
call. Each death is said and recorded (`actor_died` in run.json's part events).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa

from twig_batch.distributed.actor_report import detach_events
from twig_batch.io.manifest import item_key

READY_POLL_S = 1.0  # how often a lane waiting for its actor checks whether the run is over, or asks again


@dataclass
class _Call:
    items: pa.Table
    resends: int = 0
    handed_back: set = field(default_factory=set)

    def left(self) -> pa.Table:
        """The items whose rows have not come back yet."""
        if not self.handed_back:
            return self.items
        return self.items.filter(pa.array([key not in self.handed_back for key in _keys(self.items)]))


class _LaneEnded:
    """Put on the results queue by a lane whose actor will take no more calls."""


class ModelActors:
    """`actors` copies of `actor_class(**actor_kwargs)`, each with `options` (GPUs, CPUs, restarts)."""

    def __init__(self, actor_class, actors: int, actor_kwargs: dict, options: dict, call_retries: int):
        import ray

        remote = ray.remote(actor_class).options(max_task_retries=0, **options)
        self._actors = [remote.remote(**actor_kwargs) for _ in range(actors)]
        self.call_retries = call_retries
        self._results: queue.Queue = queue.Queue()
        self._turn = threading.Condition()  # guards everything below
        self._feed: Iterator[pa.Table] = iter(())
        self._fed_all = False
        self._resends: deque[_Call] = deque()
        self._busy = 0  # calls out on an actor now
        self._alive = actors  # actors not yet past their restarts
        self._failed = False
        self._closed = False

    def draw(self, calls: Iterator[pa.Table]) -> Iterator[tuple[pa.Table, list[dict]]]:
        """(rows, events) as each part of each call comes back, until every call is drawn: the rows and
        events of an actor's part, or None and an event of the driver's own (a death)."""
        with self._turn:
            self._feed = iter(calls)
        lanes = [threading.Thread(target=self._lane, args=(actor,), name=f"twig-lane-{n}", daemon=True)
                 for n, actor in enumerate(self._actors)]
        for lane in lanes:
            lane.start()
        ended = 0
        while ended < len(lanes):
            try:
                got = self._results.get(timeout=1.0)  # with a timeout, so that Ctrl-C reaches the driver
            except queue.Empty:
                continue
            if got is _LaneEnded:
                ended += 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got

    def close(self) -> None:
        """Stop every actor (a run that failed leaves none drawing)."""
        import ray

        with self._turn:
            self._closed = True
            self._turn.notify_all()
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 (an actor that is gone already)
                pass

    def _lane(self, actor) -> None:
        from ray.exceptions import RayActorError

        try:
            while True:
                try:
                    if not self._when_up(actor):
                        return
                except RayActorError as exc:  # dead for good: its restarts are spent
                    self._lost(actor, exc)
                    return
                call = self._next_call()
                if call is None:
                    return
                self._run(actor, call)
        except BaseException as exc:  # noqa: BLE001 (handed to the driver, which raises it)
            self._fail(exc)
        finally:
            self._results.put(_LaneEnded)

    def _when_up(self, actor) -> bool:
        """Wait until `actor` has loaded its model, through restarts; False when the run is over first.
        Raises when the actor is dead for good. A restarting actor refuses calls: the readiness call is
        asked again here, not left to Ray's retries (which print a line to the driver for each)."""
        import ray
        from ray.exceptions import ActorUnavailableError

        while True:
            ready = actor.__ray_ready__.remote()
            while not ray.wait([ready], timeout=READY_POLL_S)[0]:
                with self._turn:
                    if self._over():
                        return False
            try:
                ray.get(ready)
                return True
            except ActorUnavailableError:  # restarting
                time.sleep(READY_POLL_S)

    def _over(self) -> bool:
        return self._closed or self._failed or (self._fed_all and not self._resends and not self._busy)

    def _next_call(self) -> _Call | None:
        """A call sent back by a dead actor first, else the next of the feed; None once all are done.
        Waits while other actors hold calls that may yet come back."""
        with self._turn:
            while not (self._closed or self._failed):
                if self._resends:
                    call = self._resends.popleft()
                elif not self._fed_all:
                    items = next(self._feed, None)
                    self._fed_all = items is None
                    call = None if items is None else _Call(items)
                else:
                    call = None
                if call is not None:
                    self._busy += 1
                    return call
                if not self._busy:
                    return None
                self._turn.wait()
            return None

    def _run(self, actor, call: _Call) -> None:
        """Draw `call` on `actor`; if the actor dies, the items it had not handed back go to the others."""
        import ray
        from ray.exceptions import RayActorError

        try:
            for ref in actor.rows_by_part.options(num_returns="streaming").remote(call.left()):
                rows, events = detach_events(ray.get(ref))
                call.handed_back.update(_keys(rows))
                self._results.put((rows, events))
        except RayActorError as exc:
            if not self._closed:
                self._send_again(actor, call, exc)
            return  # the actor restarts: its lane waits for it, or ends if it is dead for good
        with self._turn:
            self._busy -= 1
            self._turn.notify_all()

    def _send_again(self, actor, call: _Call, exc: BaseException) -> None:
        left = call.left()
        with self._turn:
            self._busy -= 1
            if call.resends >= self.call_retries:
                raise exc
            call.resends += 1
            if left.num_rows:
                self._resends.append(call)
            self._turn.notify_all()
        self._say({"kind": "actor_died", "actor": _short_id(actor), "message": _first_line(exc),
                   "call_items": call.items.num_rows, "left": left.num_rows, "resend": call.resends,
                   "resends_at_most": self.call_retries})

    def _lost(self, actor, exc: BaseException) -> None:
        """An actor past its restarts: the run goes on with the others, or fails with the last."""
        with self._turn:
            self._alive -= 1
            if not self._alive and not self._over():
                raise exc
        self._say({"kind": "actor_lost", "actor": _short_id(actor), "message": _first_line(exc),
                   "actors_left": self._alive})

    def _say(self, event: dict) -> None:
        """An event of the driver's own, passed on with the actors' (no rows)."""
        self._results.put((None, [event]))

    def _fail(self, exc: BaseException) -> None:
        with self._turn:
            self._failed = True
            self._turn.notify_all()
        self._results.put(exc)


def _keys(table: pa.Table) -> list[str]:
    """The (id, sample) keys of work items or manifest rows."""
    return [item_key(i, s) for i, s in zip(table.column("id").to_pylist(), table.column("sample_index").to_pylist())]


def _short_id(actor) -> str:
    return actor._actor_id.hex()[:8]


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}"[:300]
