"""Joining a Ray cluster and sizing the actor pool to it.

Like `ray.init()`: join the cluster named by `RAY_ADDRESS` or the one `ray start` left running on
this machine, and otherwise start a local one (`RAY_ADDRESS=local` forces that). A local cluster
gets enough logical CPUs for the actors plus Ray Data's read tasks: with too few, the readers
starve behind the actors and the run stalls. A cluster is joined in its own token-authentication
mode (ray_auth.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from twig_batch.distributed import ray_auth
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
    _AUTH_MODE_BEFORE[:] = [os.environ.get(ray_auth.MODE_VAR)]
    address = os.environ.get("RAY_ADDRESS", "")
    try:
        if address != "local" and _join(address):
            return True
        # RAY_ADDRESS=local, or no cluster to join: a private one on this machine, with token
        # authentication as Ray 2.60 starts a new local cluster (said here, so Ray need not warn of it).
        if ray_auth.MODE_VAR not in os.environ:
            os.environ[ray_auth.MODE_VAR] = "token"
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, min_local_cpus), include_dashboard=False)
    except BaseException:
        _restore_auth_mode()
        raise
    return True


def disconnect() -> None:
    """Leave the cluster `connect` joined or started, and put RAY_AUTH_MODE back as it was."""
    import ray

    ray.shutdown()
    _restore_auth_mode()


_AUTH_MODE_BEFORE: list = []  # RAY_AUTH_MODE as it was before `connect`, while connected


def _restore_auth_mode() -> None:
    if _AUTH_MODE_BEFORE:
        ray_auth.use_mode(_AUTH_MODE_BEFORE.pop())


def _join(address: str) -> bool:
    """Join the cluster at `address` ("" for the one `ray start` left on this machine) in its
    authentication mode; False when there is no cluster to join."""
    import ray

    if address.startswith("ray://"):  # Ray Client: the server side authenticates
        ray.init(address=address)
        return True
    from ray._private.services import canonicalize_bootstrap_address

    try:
        gcs_address = canonicalize_bootstrap_address(address or "auto")
    except ConnectionError:  # nothing `ray start` left running here
        return False
    if gcs_address is None:
        return False
    ray_auth.match_cluster_auth(gcs_address)
    try:
        ray.init(address=gcs_address)  # the cluster just asked, even where "auto" could pick another
    except ConnectionError:
        if address:
            raise
        return False  # a stale record of a cluster that is gone
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
