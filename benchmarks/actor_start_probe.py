"""How long an actor takes to reach its `__init__`: a plain Ray actor against a Ray Data map worker.

Usage: python benchmarks/actor_start_probe.py [--out FILE.json] [--repeats 2]

Both actors hold nothing (an `__init__` that notes the time), so what is measured is Ray's part of an
actor's start: a plain actor (`ray.remote(num_cpus=1)`), and Ray Data's `map_batches` over an actor
pool of one (what `twig-batch run` uses), each timed from the call that asks for it. Per actor:
- born_s: when its worker process was started, relative to the request (negative: a worker Ray had
  started beforehand);
- init_s: when its `__init__` began;
- loaded: which heavy modules its process had imported by then (ray.data, pandas, torch).
Each kind runs `--repeats` times in one private Ray cluster (the first of each pays cold caches).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HEAVY = ("ray.data", "pandas", "pyarrow", "torch", "transformers")


def _process_start_time() -> float:
    """This process's start as a wall-clock time (from /proc: its start in ticks after boot)."""
    ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    uptime = float(open("/proc/uptime").read().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


class Noted:
    """An actor that notes when its process started, when `__init__` began and what was loaded then."""

    def __init__(self):
        self.note = {"init_at": time.time(), "born_at": _process_start_time(),
                     "loaded": [name for name in HEAVY if name in sys.modules], "pid": os.getpid()}

    def read(self):
        return self.note

    def __call__(self, batch):
        batch["note"] = [json.dumps(self.note)] * len(batch["id"])
        return batch


def _relative(note: dict, asked: float) -> dict:
    return {"born_s": round(note["born_at"] - asked, 2), "init_s": round(note["init_at"] - asked, 2),
            "loaded": note["loaded"], "pid": note["pid"]}


def plain_actor() -> dict:
    import ray

    asked = time.time()
    actor = ray.remote(num_cpus=1)(Noted).remote()
    note = ray.get(actor.read.remote())
    ray.kill(actor)
    return _relative(note, asked)


def ray_data_actor() -> dict:
    import ray

    asked = time.time()
    rows = ray.data.range(2).map_batches(Noted, batch_size=2, num_cpus=1,
                                         compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    return _relative(json.loads(rows[0]["note"]), asked)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import ray

    started = time.time()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    import ray.data  # the driver's own import is not the actor's: done before any timing

    result = {"ray": ray.__version__, "init_s": round(time.time() - started, 2), "plain": [], "ray_data": []}
    for _ in range(args.repeats):
        result["plain"].append(plain_actor())
        result["ray_data"].append(ray_data_actor())
    ray.shutdown()
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
