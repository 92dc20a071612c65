"""The cluster configs parse and say what matters: entrypoint, GPUs, image, installing this package."""
import shlex
from pathlib import Path

import pytest
import ray
import typer
import yaml

from twig_batch.cli import app

REPO = Path(__file__).resolve().parents[1]
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"  # pinned to the Ray the suite runs


def load(name):
    return yaml.safe_load((REPO / name).read_text())


def parses_as_run_options(args):
    """The `twig-batch run` parser accepts these arguments (nothing is run)."""
    run = typer.main.get_command(app).commands["run"]
    context = run.make_context("run", list(args))
    assert context.params["output"] and context.params["input"]
    return context.params


def test_aws_launcher_config():
    config = load("cluster/aws-gpu.yaml")
    assert config["provider"]["type"] == "aws" and config["docker"]["image"] == RAY_IMAGE
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert workers and all(w["resources"]["GPU"] >= 1 for w in workers)
    assert all(w["node_config"]["InstanceType"][0] in "gp" for w in workers)  # AWS GPU families
    assert config["max_workers"] >= max(w["max_workers"] for w in workers)
    for node in nodes.values():
        assert node["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:/aws/service/deeplearning/"))
    # The repository is synced to every node and installed there with cluster/install.sh.
    (remote, local), = config["file_mounts"].items()
    assert local == "." and f"bash {remote}/cluster/install.sh" in config["setup_commands"]
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_kuberay_rayjob():
    job = load("cluster/kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__

    entrypoint = shlex.split(spec["entrypoint"])
    assert entrypoint[0] == "python" and entrypoint[1] == "/home/ray/twig-batch/jobs/generate_batch.py"
    assert parses_as_run_options(entrypoint[2:])["mode"] == "twig"

    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = cluster["workerGroupSpecs"]
    containers = [head] + [g["template"]["spec"]["containers"][0] for g in workers]
    for container in containers:
        assert container["image"] == RAY_IMAGE
        script = container["args"][0]
        # Clone to where the entrypoint looks, install this package, then the generated `ray start`.
        assert "/home/ray/twig-batch &&" in script and "bash /home/ray/twig-batch/cluster/install.sh &&" in script
        assert script.rstrip().endswith("$KUBERAY_GEN_RAY_START_CMD")
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in workers:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] >= 1
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_example_runtime_env_ships_the_repository_without_secrets():
    env = load("jobs/runtime_env.yaml")
    assert env["working_dir"] == "." and ".git" in env["excludes"]
    text = (REPO / "jobs" / "runtime_env.yaml").read_text()
    for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        assert secret not in text and secret not in env["env_vars"]


@pytest.mark.parametrize("document", ["docs/batch-job.md", "cluster/README.md", "cluster/aws-gpu.yaml"])
def test_documented_job_commands_parse(document):
    text = (REPO / document).read_text().replace("\\\n", " ")
    commands = [line.strip().lstrip("#").strip() for line in text.splitlines() if "jobs/generate_batch.py" in line]
    commands = [c.removeprefix("RAY_AUTH_MODE=token ") for c in commands]
    commands = [c for c in commands if c.startswith(("ray job submit", "--", "python"))]
    assert commands
    for command in commands:
        words = shlex.split(command.replace("$PWD", "/tmp"))
        args = words[words.index("jobs/generate_batch.py") + 1:]
        parses_as_run_options(args)
        if words[0] == "ray":
            assert words[:4] == ["ray", "job", "submit", "--address"] and "--working-dir" in words
