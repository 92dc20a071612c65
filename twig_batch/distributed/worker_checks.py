"""What the driver cannot see for itself, checked where the actors will run, before any model loads.

A checkpoint folder the driver lacks may exist on the GPU nodes of a cluster, so it is not refused
on the driver alone: on a private local cluster (the driver's own machine) it is refused before Ray
starts, and on a joined cluster one small task with an actor's resources looks for it on a worker
node. S3 access is checked the same way on a joined cluster: its workers resolve their own AWS
credentials, which need not be the shell's. Either way the problem is one line, and no actor has
started.
"""
from __future__ import annotations

from pathlib import Path

from twig_batch.errors import ModelLoadError, OutputError


def missing_on_this_machine(ref: str) -> bool:
    """A model reference that can only be a folder (not a built-in model, not a Hugging Face
    `org/name`), and no folder here."""
    from twig_batch.model.checkpoint import BUILTIN_GRIDS, RANDOM_MODELS

    if ref in BUILTIN_GRIDS or ref in RANDOM_MODELS:
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

    from twig_batch.model.checkpoint import check_checkpoint

    try:
        check_checkpoint(ref)
    except ModelLoadError as exc:
        return f"on the Ray worker {socket.gethostname()}: {exc}"
    if not Path(ref).expanduser().exists():
        return f"on the Ray worker {socket.gethostname()}: model folder {ref} does not exist"
    return None


def check_storage_on_a_worker(input_files, storage, plan) -> None:
    """On a joined cluster, with S3 in or out: can a node that hosts actors read the input and write
    the output? If not, one line says what the workers lack compared with this shell."""
    from twig_batch.distributed.cluster import started_private_cluster
    from twig_batch.io.storage import S3Storage

    if started_private_cluster():  # its workers have this process's environment, checked in the preflight
        return
    input_key = input_files.paths[0] if input_files.uri.startswith("s3://") else None
    if input_key is None and not isinstance(storage, S3Storage):
        return
    import ray

    endpoint = storage.endpoint if isinstance(storage, S3Storage) else None
    probe = ray.remote(_storage_problem).options(num_cpus=min(plan.cpus_per_actor, 1), num_gpus=plan.gpus_per_actor,
                                                 max_retries=0)
    problem, theirs = ray.get(probe.remote(input_key, storage, endpoint))
    if problem is None:
        return
    ours = _credential_source()
    raise OutputError(
        f"the Ray workers {problem}. This shell's AWS credentials come from {ours or 'nowhere'}, the workers' from "
        f"{theirs or 'nowhere'}: give the workers credentials of their own (an instance role; the AWS variables in "
        "the environment of `ray start` on every node; or a profile in ~/.aws on every node, named here by "
        "AWS_PROFILE). twig-batch passes the workers the profile name, endpoint and region, never keys")


def _storage_problem(input_key: str | None, storage, endpoint) -> tuple[str | None, str | None]:
    from twig_batch.errors import TwigBatchError
    from twig_batch.io.s3 import S3Endpoint, explain_s3_error, new_client
    from twig_batch.io.storage import S3Storage

    source = _credential_source()
    if input_key is not None:
        bucket, _, key = input_key.partition("/")
        try:
            new_client(endpoint or S3Endpoint.resolve()).head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # one sentence, as the driver's own checks say it
            return f"cannot read {explain_s3_error(exc, f's3://{input_key}')}", source
    if isinstance(storage, S3Storage):
        try:
            storage.check_writable()
        except TwigBatchError as exc:
            return str(exc), source
    return None, source


def _credential_source() -> str | None:
    """Where boto3 finds credentials in this process ("env", "shared-credentials-file", "iam-role",
    ...): never the credentials themselves."""
    import boto3

    try:
        credentials = boto3.session.Session().get_credentials()
    except Exception:
        return None
    return getattr(credentials, "method", None) if credentials is not None else None
