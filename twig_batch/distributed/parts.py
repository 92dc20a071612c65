"""Drawing an actor's work in parts, and what happens when a part fails.

A part is the requests of one `generate_images` call. A failure is never quietly turned into a
slower run:
- out of memory: the part is split in halves (again, if a half fails too), and the size that
  worked caps every later part of this actor;
- any other error: the part is bisected, so the rows that fail are found without drawing the
  part row by row. When both halves fail with the part's own error and so does its first row
  alone, the error is not about particular rows: the whole part fails with it, after four calls;
- an error that leaves the device unusable (a CUDA error) is raised: Ray restarts the actor and
  retries its batch.
Each split and failure becomes a `PartEvent`, which the actor hands to the driver with its rows:
the driver says it once and records it in run.json.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable


@dataclass(frozen=True, slots=True)
class PartEvent:
    kind: str  # "out_of_memory" (the part was split) or "part_failed" (its rows were isolated)
    part_images: int
    message: str  # the error: type and first line
    into: tuple[int, ...] = ()  # out_of_memory: the sizes the part was split into
    outcome: str = ""  # part_failed: what the isolation found

    def record(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v not in ("", ())}


@dataclass(slots=True)
class Drawn:
    """One request's outcome: its result, or the reason it has none; `seconds` is its share of the call."""

    request: object
    result: object = None
    error: str | None = None
    seconds: float = 0.0


def describe(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def breaks_the_device(exc: BaseException) -> bool:
    """A CUDA error (an illegal access, a device-side assert) poisons every later call in this process."""
    return type(exc).__name__ == "AcceleratorError" or "CUDA error" in str(exc)


@dataclass
class PartDrawer:
    """`draw(requests) -> results` is one model call; `free_memory()` runs after an out-of-memory
    error, before the halves are drawn."""

    draw: Callable[[list], list]
    free_memory: Callable[[], None] = lambda: None
    cap: int | None = None  # the most images per part since an out-of-memory error; None: no limit yet
    events: list[PartEvent] = field(default_factory=list)

    def parts(self, requests: list, size: int) -> list[list]:
        size = min(size, self.cap or size)
        return [requests[i:i + size] for i in range(0, len(requests), size)]

    def run(self, part: list) -> list[Drawn]:
        """Every request of `part` with its result or its error."""
        outcome = self._attempt(part)
        if isinstance(outcome, list):
            return outcome
        drawn, whole = self._isolate(part, outcome)
        failed = sum(1 for d in drawn if d.error is not None)
        verdict = ("every row failed: the error is not about particular rows" if whole
                   else f"{failed} of {len(part)} row(s) failed; the others were drawn")
        self.events.append(PartEvent("part_failed", len(part), describe(outcome), outcome=verdict))
        return drawn

    def _attempt(self, part: list) -> list[Drawn] | BaseException:
        """The part drawn in one call (halved on out-of-memory), or the exception it raised."""
        start = time.perf_counter()
        try:
            results = self.draw(part)
        except Exception as exc:  # noqa: BLE001 (each kind of failure is handled below)
            if breaks_the_device(exc):
                raise
            if is_out_of_memory(exc):
                return self._halve(part, exc)
            return exc
        share = (time.perf_counter() - start) / len(part)
        return [Drawn(request, result, seconds=share) for request, result in zip(part, results)]

    def _halve(self, part: list, exc: BaseException) -> list[Drawn]:
        message = describe(exc)
        exc.__traceback__ = None  # its frames hold the failed call's tensors
        self.free_memory()
        if len(part) == 1:
            return [Drawn(part[0], error=f"out of memory even for one image: {message}")]
        half = (len(part) + 1) // 2
        self.cap = min(self.cap or half, half)
        self.events.append(PartEvent("out_of_memory", len(part), message, into=(half, len(part) - half)))
        return self.run(part[:half]) + self.run(part[half:])

    def _isolate(self, part: list, exc: BaseException) -> tuple[list[Drawn], bool]:
        """`part` raised `exc` (not out of memory): each row's outcome, and whether the whole part
        was found to fail whatever its rows."""
        message = describe(exc)
        if len(part) == 1:
            return [Drawn(part[0], error=f"generation failed: {message}")], False
        half = (len(part) + 1) // 2
        halves = (part[:half], part[half:])
        outcomes = [self._attempt(h) for h in halves]
        if all(not isinstance(o, list) and describe(o) == message for o in outcomes):
            probe = self._attempt(part[:1])
            if not isinstance(probe, list) and describe(probe) == message:
                return [Drawn(request, error=f"generation failed: {message}") for request in part], True
            # The first row behaves otherwise alone: the rest of its half is tried again without it.
            first = probe if isinstance(probe, list) else [Drawn(part[0], error=f"generation failed: {describe(probe)}")]
            rest = halves[0][1:]
            if rest:
                again = self._attempt(rest)
                first += again if isinstance(again, list) else self._isolate(rest, again)[0]
            outcomes[0] = first
        drawn = []
        for h, outcome in zip(halves, outcomes):
            drawn += outcome if isinstance(outcome, list) else self._isolate(h, outcome)[0]
        return drawn, False
