"""Joining a Ray cluster and sizing the actor pool to it.

Like `ray.init()`: join the cluster named by `RAY_ADDRESS` or the one `ray start` left running on
this machine, and otherwise start a local one (`RAY_ADDRESS=local` forces that). A cluster that
does not answer is found in seconds, not left to Ray (which retries a dead address for about a
quarter of an hour, printing only its own warnings): a named one is an error, and a record that
`ray start` left behind for a cluster that has since died (killed, not stopped) is said once and
a local cluster starts instead. A local cluster gets logical CPUs for the actors and two more (the
run's small tasks and its retry board). A cluster is joined in its own token-authentication mode
(ray_auth.py).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass

from twig_batch.distributed import ray_auth
from twig_batch.errors import InputError, TwigBatchError

GCS_ANSWER_TIMEOUT_S = 3.0  # a live head accepts a connection at once, even under load


class ClusterUnreachableError(TwigBatchError):
    """RAY_ADDRESS names a cluster that does not answer."""


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
    # A task that Ray retries (an actor's location query while it dies) is not news: the run says
    # what failed once it has failed.
    os.environ.setdefault("RAY_enable_output_error_log_if_still_retry", "0")
    address = os.environ.get("RAY_ADDRESS", "")
    try:
        if address != "local" and _join(address):
            return True
        # RAY_ADDRESS=local, or no cluster to join: a private one on this machine, with token
        # authentication as Ray 2.60 starts a new local cluster (said here, so Ray need not warn of it).
        if ray_auth.MODE_VAR not in os.environ:
            ray_auth.use_mode("token")
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, min_local_cpus), include_dashboard=False,
                 **_QUIET)
        _PRIVATE[:] = [True]
        _watch_private_cluster()
    except BaseException:
        _restore_auth_mode()
        raise
    return True


def disconnect() -> None:
    """Leave the cluster `connect` joined or started, and put RAY_AUTH_MODE back as it was."""
    import ray

    ray.shutdown()
    _restore_auth_mode()
    _PRIVATE.clear()
    STALE_RECORDS.clear()
    from twig_batch.distributed.reaper import release

    while _WATCHER:
        release(_WATCHER.pop())


_WATCHER: list = []  # the process that stops a private cluster when its driver dies (reaper.py)


def _watch_private_cluster() -> None:
    """A driver killed outright cannot stop the cluster it started; a watcher of its own then does."""
    from ray._private import worker

    from twig_batch.distributed.reaper import watch_cluster

    try:
        _WATCHER.append(watch_cluster(worker._global_node.get_session_dir_path()))
    except Exception as exc:  # noqa: BLE001 (the run goes on; only a hard kill of this driver would leave processes)
        print(f"note: the watcher of this run's Ray cluster could not start ({type(exc).__name__}: {exc}); if this "
              "driver is killed outright, `ray stop` ends what it leaves running", file=sys.stderr)


_PRIVATE: list = []  # [True] while connected to a private local cluster `connect` started


def started_private_cluster() -> bool:
    """The workers are this machine's, started from this process's environment."""
    return bool(_PRIVATE)


# What the workers of a joined cluster may learn from this shell: where S3 is and which profile to
# use. Never keys or tokens: a runtime environment is kept in the job's metadata.
FORWARDED_AWS_SETTINGS = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def forwarded_env() -> dict:
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a submitted job: its workers have the job's own env
        return {}
    return {name: os.environ[name] for name in FORWARDED_AWS_SETTINGS if os.environ.get(name)}


_AUTH_MODE_BEFORE: list = []  # RAY_AUTH_MODE as it was before `connect`, while connected


def _restore_auth_mode() -> None:
    if _AUTH_MODE_BEFORE:
        ray_auth.use_mode(_AUTH_MODE_BEFORE.pop())


def address_to_join() -> str | None:
    """The cluster `connect` would join (its GCS address, or a ray:// address), or None when it
    would start a private one on this machine."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = os.environ.get("RAY_ADDRESS", "")
    if address == "local":
        return None
    if address.startswith("ray://"):
        return address
    from ray._private.services import canonicalize_bootstrap_address

    try:
        # With no address, only the cluster `ray start` recorded (/tmp/ray/ray_current_cluster). "auto"
        # would also join any head it finds running here: another driver's private cluster, which
        # ends with that driver and takes this run down with it.
        return canonicalize_bootstrap_address(address or None)
    except ConnectionError:  # RAY_ADDRESS=auto and nothing running here
        return None


def _join(address: str) -> bool:
    """Join the cluster at `address` ("" for the one `ray start` left on this machine) in its
    authentication mode; False when there is no cluster to join."""
    import ray

    gcs_address = address_to_join()
    if gcs_address is None:
        return False
    forwarded = forwarded_env()
    extra = {"runtime_env": {"env_vars": forwarded}} if forwarded else {}
    if gcs_address.startswith("ray://"):  # Ray Client: the server side authenticates
        ray.init(address=gcs_address, **_QUIET, **extra)
        return True
    if not answers(gcs_address):
        if address:
            raise ClusterUnreachableError(
                f"RAY_ADDRESS={address}: no Ray cluster answers at {gcs_address} (nothing accepts a connection "
                f"there within {GCS_ANSWER_TIMEOUT_S:g} s); start it, or unset RAY_ADDRESS to use a local cluster")
        _say_stale_record(gcs_address)
        return False
    ray_auth.match_cluster_auth(gcs_address)
    try:
        ray.init(address=gcs_address, **_QUIET, **extra)  # the cluster just asked, even where "auto" could pick another
    except ConnectionError:
        if address:
            raise
        _say_stale_record(gcs_address)
        return False
    return True


def answers(gcs_address: str, timeout_s: float = GCS_ANSWER_TIMEOUT_S) -> bool:
    """Whether anything accepts a connection at a GCS address (host:port)."""
    host, _, port = gcs_address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _say_stale_record(gcs_address: str) -> None:
    STALE_RECORDS.append(gcs_address)
    print(f"note: the Ray cluster `ray start` recorded on this machine ({gcs_address}) does not answer: it ended "
          "without `ray stop`. This run starts a local Ray cluster of its own; `ray stop` clears the record, "
          "`ray start --head` starts a shared cluster again", file=sys.stderr)


STALE_RECORDS: list = []  # dead `ray start` clusters found recorded by `connect`, until `disconnect` (for run.json)


# Our lines say what happens; the actors' own output and Ray's start-up notes stay in the session's
# logs (`logs_dir`), where a failure's one line points.
_QUIET = {"log_to_driver": False, "logging_level": logging.WARNING}


def logs_dir() -> str | None:
    """Where this machine keeps the Ray session's logs (the actors' output on a local cluster)."""
    try:
        from ray._private import worker

        return worker._global_node.get_logs_dir_path()
    except Exception:  # a Ray Client connection, or no session here
        return None


def free_gpus() -> float:
    """The GPUs no actor or task of any job holds right now."""
    import ray

    return float(ray.available_resources().get("GPU", 0))


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
