"""What the driver cannot see for itself, checked where the actors will run, before any model loads.

A checkpoint folder the driver lacks may exist on the GPU nodes of a cluster, so it is not refused
on the driver alone: on a private local cluster (the driver's own machine) it is refused before Ray
starts, and on a joined cluster one small task with an actor's resources looks for it on a worker
node. Either way the problem is one line, and no actor has started.
"""
from __future__ import annotations

from pathlib import Path

from twig_batch.errors import ModelLoadError


def missing_on_this_machine(ref: str) -> bool:
    """A model reference that can only be a folder (not a built-in model, not a Hugging Face
    `org/name`), and no folder here."""
    from twig_batch.model.tiny import BUILTIN_GRIDS

    if ref in BUILTIN_GRIDS or ref in ("random-7b", "random-1b"):
        return False
    hub_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
    return not hub_id and not Path(ref).expanduser().exists()


def check_model_before_ray(ref: str, starts_private_cluster: bool) -> None:
    """A folder missing here is missing on every actor of a private local cluster."""
    if starts_private_cluster and missing_on_this_machine(ref):
        raise ModelLoadError(f"model folder {ref} does not exist")


def check_model_on_a_worker(ref: str, plan) -> None:
    """For a folder this machine lacks: look for it, as the actors will, on a node that can host one."""
    if not missing_on_this_machine(ref):
        return
    import ray

    probe = ray.remote(_checkpoint_problem).options(num_cpus=min(plan.cpus_per_actor, 1),
                                                     num_gpus=plan.gpus_per_actor, max_retries=0)
    problem = ray.get(probe.remote(ref))
    if problem is not None:
        raise ModelLoadError(problem)


def _checkpoint_problem(ref: str) -> str | None:
    import socket

    from twig_batch.model.loading import check_checkpoint

    try:
        check_checkpoint(ref)
    except ModelLoadError as exc:
        return f"on the Ray worker {socket.gethostname()}: {exc}"
    if not Path(ref).expanduser().exists():
        return f"on the Ray worker {socket.gethostname()}: model folder {ref} does not exist"
    return None
