"""A workstation cluster as cluster/README.md starts one (`ray start`, token authentication off) on a
machine where an earlier cluster left a token in ~/.ray/auth_token: `twig-batch run` with no Ray
variables joins it in its mode, and a driver told the other mode says so in one line. Its workers
have no AWS settings of the shell's: S3 access is checked on a worker before any model loads, and
the profile name, endpoint and region travel to them, never keys. The token-on cluster is in
test_job_submit.py."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch_support import (ACCESS_KEY, SECRET_KEY, cluster_auth_mode, ray_head, read_manifest, s3_client, s3_server,
                           upload_parquet, write_prompts)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def open_head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("a stale token from an earlier cluster " + "0" * 26)
    with ray_head(auth_mode="disabled", home=home) as (dashboard, gcs, env):
        assert cluster_auth_mode(dashboard) == "disabled"
        yield dashboard, gcs, env


def run_cli(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "twig_batch.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_run_joins_an_open_cluster_despite_a_stale_token(open_head, tmp_path):
    """Ray alone would switch token authentication on from the stale file, and every actor would die."""
    _, _, env = open_head  # no RAY_ADDRESS: found through $RAY_TMPDIR/ray, as `ray start` left it
    prompts = write_prompts(tmp_path / "p.parquet", 3)
    result = run_cli(["run", prompts, "-o", tmp_path / "out", "--model", "tiny-micro"], env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "(3 ok, 0 error rows)" in output
    # Ray prints an error line for a restartable actor whose constructor arguments sit in its object
    # store (ray-project/ray#53727), a handle among them: the run's actors get the retry board by name.
    # Ray prints it late, as the driver leaves, and not in every run: a regression shows here in some.
    assert "core_worker.cc" not in output and "ObjectRef" not in output, output[-3000:]
    assert {r["status"] for r in read_manifest(tmp_path / "out").to_pylist()} == {"ok"}


def test_token_mode_against_an_open_cluster_is_one_line(open_head, tmp_path):
    _, gcs, env = open_head
    prompts = write_prompts(tmp_path / "p.parquet", 2)
    result = run_cli(["run", prompts, "-o", tmp_path / "out", "--model", "tiny-micro"],
                     dict(env, RAY_ADDRESS=gcs, RAY_AUTH_MODE="token"), timeout=120)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "has token authentication off, but RAY_AUTH_MODE=token here" in lines[0]


@pytest.fixture(scope="module")
def s3(open_head):
    with s3_server() as endpoint:
        for bucket in ("prompts-in", "images-out"):
            s3_client().create_bucket(Bucket=bucket)
        yield endpoint


def s3_env(open_head, **settings):
    """The driver's environment: the head's home and temp dir, the S3 server's endpoint, and `settings`."""
    _, gcs, env = open_head
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {**env, **aws, "RAY_ADDRESS": gcs, **settings}


def test_workers_without_the_shells_credentials_are_one_line_before_any_model(open_head, s3, tmp_path):
    prompts = upload_parquet("prompts-in", "lacking/p.parquet", pq.read_table(write_prompts(tmp_path / "p.parquet", 2)))
    result = run_cli(["run", prompts, "-o", "s3://images-out/lacking", "--model", "tiny-micro"], s3_env(open_head),
                     timeout=300)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: the Ray workers cannot read {prompts}: no usable AWS credentials")
    assert "This shell's AWS credentials come from env, the workers' from nowhere: give the workers" in lines[0]
    assert SECRET_KEY not in lines[0] and ACCESS_KEY not in lines[0]
    listed = s3_client().list_objects_v2(Bucket="images-out", Prefix="lacking/")
    assert listed.get("KeyCount", 0) == 0  # nothing written: no run.json, no images


def test_a_profile_name_reaches_the_workers_and_keys_never_do(open_head, s3, tmp_path):
    _, _, head_env = open_head
    credentials = Path(head_env["HOME"]) / ".aws" / "credentials"  # on "every node": the head's home
    credentials.parent.mkdir(exist_ok=True)
    credentials.write_text(f"[twig]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    prompts = upload_parquet("prompts-in", "profile/p.parquet", pq.read_table(write_prompts(tmp_path / "p.parquet", 2)))
    env = s3_env(open_head, AWS_PROFILE="twig")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        env.pop(name, None)
    result = run_cli(["run", prompts, "-o", "s3://images-out/profile", "--model", "tiny-micro"], env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    manifest = pq.read_table(io.BytesIO(s3_client().get_object(Bucket="images-out", Key="profile/manifest.parquet")["Body"]
                                        .read()))
    assert set(manifest.column("status").to_pylist()) == {"ok"}


def test_only_settings_that_are_not_secret_are_forwarded(monkeypatch):
    from twig_batch.distributed.cluster import forwarded_env

    for name, value in {"AWS_PROFILE": "dev", "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1",
                        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                        "AWS_SESSION_TOKEN": "token"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert forwarded_env() == {"AWS_PROFILE": "dev", "AWS_ENDPOINT_URL": "http://minio:9000",
                               "AWS_REGION": "eu-west-1"} | ({"AWS_DEFAULT_REGION": os.environ["AWS_DEFAULT_REGION"]}
                                                             if os.environ.get("AWS_DEFAULT_REGION") else {})
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # inside a submitted job: nothing
    assert forwarded_env() == {}


# The holder is given the head's address: found by itself ("auto"), it may pick another test's cluster
# when several run on the machine. It gives up after two minutes rather than wait for a GPU forever.
HOLD_ONE_GPU = """
import sys
import ray
ray.init(address=sys.argv[1])
holder = ray.remote(num_gpus=1, num_cpus=0)(type("Holder", (), {"ping": lambda self: 1})).remote()
ray.get(holder.ping.remote(), timeout=120)
print("holding", flush=True)
sys.stdin.read()
"""


def test_actors_that_find_no_free_gpu_are_said_and_the_run_goes_on_with_the_others(tmp_path):
    """Another job holds one of the two GPUs (in name: a CPU machine's head declares them): of the two
    actors planned one starts, the run says so once, records it, and draws every image with it."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    with ray_head(auth_mode="disabled", home=home, num_gpus=2) as (_, gcs, env):
        env = {**env, "RAY_AUTH_MODE": "disabled"}
        holder = subprocess.Popen([sys.executable, "-c", HOLD_ONE_GPU, gcs], env=env, text=True, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=open(tmp_path / "holder.log", "w"))
        try:
            # Ray's driver may print lines of its own first (the autoscaler's tip when the holder waits
            # a few seconds for its GPU on a busy machine).
            line = ""
            while line.strip() != "holding":
                line = holder.stdout.readline()
                assert line, (tmp_path / "holder.log").read_text()[-2000:]  # the holder ended without holding
            prompts = write_prompts(tmp_path / "p.parquet", 4)
            result = run_cli(["run", prompts, "-o", tmp_path / "out", "--model", "tiny-micro", "--device", "cpu",
                              "--gpus-per-actor", "1"], env)
        finally:
            holder.stdin.close()
            holder.wait(timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "2 actor(s), 1 GPU each" in output
    assert output.count("note: 1 of the 2 GPU(s) this run's 2 actor(s) need are free now") == 1, output[-3000:]
    assert "(4 ok, 0 error rows)" in output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["attempts"][-1]["gpus_free_at_start"] == 1
