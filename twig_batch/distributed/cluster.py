"""Joining a Ray cluster and sizing the actor pool to it.

Like `ray.init()`: join the cluster named by `RAY_ADDRESS` or the one `ray start` left running on
this machine, and otherwise start a local one (`RAY_ADDRESS=local` forces that). A local cluster
gets enough logical CPUs for the actors plus Ray Data's read tasks: with too few, the readers
starve behind the actors and the run stalls.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from twig_batch.errors import InputError


@dataclass(frozen=True, slots=True)
class ActorPlan:
    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    cluster_gpus: float
    cluster_cpus: float


def connect(min_local_cpus: int = 3) -> bool:
    """Join or start Ray; returns True when this call started (and so owns) the connection."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        ray.init(address=address)
        return True
    if not address:
        try:
            ray.init(address="auto")
            return True
        except ConnectionError:
            pass
    # RAY_ADDRESS=local, or no cluster to join: a private one on this machine.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, min_local_cpus), include_dashboard=False)
    return True


def plan_actors(actors: int | None, gpus_per_actor: float | None, cpus_per_actor: float, device: str) -> ActorPlan:
    """One GPU per actor and one actor per GPU by default; a CPU-only cluster gets GPU-less actors."""
    import ray

    resources = ray.cluster_resources()
    cluster_gpus, cluster_cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster_gpus > 0 else 0.0
    if device.startswith("cuda") and gpus_per_actor == 0:
        raise InputError(f"device {device!r} asked for, but the Ray cluster has no GPU "
                         "(an autoscaling cluster: pass --gpus-per-actor 1 explicitly)")
    if actors is None:
        actors = max(1, int(cluster_gpus // gpus_per_actor)) if gpus_per_actor > 0 else 1
    return ActorPlan(actors, gpus_per_actor, cpus_per_actor, cluster_gpus, cluster_cpus)
