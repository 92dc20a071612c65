"""The driver's side of the actors' events: each said once in its output and kept in run.json.

Startups, part sizes and the kernels an actor runs uncompiled are said once per actor. An
out-of-memory split or a failed part is said the first time it happens with a given error; repeats
are counted. All of it lands in the current attempt's record in run.json (`actor_stats`,
`part_events`) as soon as it arrives, so a run that is killed later still says what happened.
"""
from __future__ import annotations

import time

from twig_batch.distributed.actor_report import describe_event
from twig_batch.io.run_info import write_run_info

KEPT_PART_EVENTS = 200  # in run.json; later ones are only counted


class RunEvents:
    def __init__(self, storage, info: dict, echo=print):
        self.storage, self.info, self.echo = storage, info, echo
        self.attempt = info["attempts"][-1]
        self.started = time.monotonic()  # part arrival times count from here (seconds into the attempt)
        self.attempt.setdefault("actor_stats", {})
        self.attempt.setdefault("part_events", [])
        self.attempt.setdefault("part_event_counts", {})
        self._said: set[tuple] = set()

    def add(self, events: list[dict]) -> None:
        changed = False
        for event in events:
            changed |= self._add(event)
        if changed:
            write_run_info(self.storage, self.info)

    def steady_images_per_s(self) -> float | None:
        """Images per second once running, summed over the actors (None before any has a rate): each
        actor's rows after its first part over the time from that part's arrival to its last. An actor
        in the mixed loop hands rows back as images finish, and those after its first rows were drawn
        partly before them: all its rows over its drawing time count instead."""
        rates = [rate for rate in map(_steady_rate, self.attempt["actor_stats"].values()) if rate is not None]
        return sum(rates) if rates else None

    def actors_drawing(self) -> int:
        """Actors that have said their part size: they have started to draw."""
        return sum(1 for a in self.attempt["actor_stats"].values() if "part_images" in a)

    def running_images_per_s(self) -> float | None:
        """The steady rate once known; before that, each actor's own rate over its first part (graph
        captures included), summed: after the first rows, an ETA from it is minutes closer than one from
        the rate since the start, which carries the actors' start."""
        steady = self.steady_images_per_s()
        if steady is not None:
            return steady
        rates = [a["first_part_images"] / a["first_part_s"] for a in self.attempt["actor_stats"].values()
                 if a.get("parts") and a.get("first_part_s")]
        return sum(rates) if rates else None

    def _add(self, event: dict) -> bool:
        kind, actor = event["kind"], event.get("actor", "?")
        if kind == "part":  # the actor's own timing of each part: counted, not said
            record = self.attempt["actor_stats"].setdefault(actor, {})
            now = time.monotonic() - self.started
            if not record.get("parts"):
                record.update(first_part_at=round(now, 3), first_part_images=event["images"],
                              first_part_s=event["draw_s"], images=0, busy_s=0.0)
            record["parts"] = record.get("parts", 0) + 1
            record["images"] += event["images"]
            record["busy_s"] = round(record["busy_s"] + event["draw_s"], 3)
            record["last_part_at"] = round(now, 3)
            return False
        if kind in ("startup", "part_size"):
            record = self.attempt["actor_stats"].setdefault(actor, {})
            key = "startup_s" if kind == "startup" else "part_images"
            value = event["startup_s"] if kind == "startup" else event["images"]
            if record.get(key) == value:
                return False
            record[key] = value
            if kind == "startup":
                record.update(device=event.get("device"), model_load_s=event.get("model_load_s"),
                              warm_up_s=event.get("warm_up_s"))
            elif "loop" in event:  # which loop draws its images (they differ in bf16)
                record["loop"] = event["loop"]
            self.echo(describe_event(event))
            return True
        if kind == "uncompiled_kernels":  # a compile fallback: slower, the same images
            record = self.attempt["actor_stats"].setdefault(actor, {})
            if record.get("uncompiled_kernels") == event["kernels"]:
                return False
            record["uncompiled_kernels"] = event["kernels"]
            self.echo(describe_event(event))
            return True
        counts = self.attempt["part_event_counts"]
        counts[kind] = counts.get(kind, 0) + 1
        if len(self.attempt["part_events"]) < KEPT_PART_EVENTS:
            self.attempt["part_events"].append(event)
        said = (kind, event.get("message"), event.get("part_images"))
        if said not in self._said:
            self._said.add(said)
            self.echo(describe_event(event))
        return True


def _steady_rate(actor: dict) -> float | None:
    if actor.get("loop") == "mixed":
        return actor["images"] / actor["busy_s"] if actor.get("parts") and actor.get("busy_s") else None
    if actor.get("parts", 0) > 1 and actor["last_part_at"] > actor["first_part_at"]:
        return (actor["images"] - actor["first_part_images"]) / (actor["last_part_at"] - actor["first_part_at"])
    return None
