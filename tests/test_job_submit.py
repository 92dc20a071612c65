"""A `ray start --head` cluster with Ray 2.60's token authentication on, as the docs leave one: the
documented `ray job submit` line, `twig-batch run` joining it by itself, and each way of getting the
token wrong said in one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from batch_support import cluster_auth_mode, ray_head, read_manifest, write_prompts

REPO = Path(__file__).resolve().parents[1]
TOKEN = "7f3c0a9e2b5d48e1a6c4f0b9d2e7a1c35b8e4f6a0d9c2b7e1f5a3c8d0b6e4a29"


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A head started the default way on a machine that holds a token (the quick start's local
    cluster writes ~/.ray/auth_token): Ray turns token authentication on."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(TOKEN)
    with ray_head(auth_mode=None, home=home) as (dashboard, gcs, env):
        assert cluster_auth_mode(dashboard) == "token"
        yield dashboard, gcs, env


def documented_submit_line() -> list[str]:
    text = (REPO / "docs" / "batch-job.md").read_text()
    line = next(line for line in text.splitlines() if "ray job submit --address" in line and "jobs/" in line)
    return line.split()


def run_cli(args, env, cwd=REPO, timeout=600):
    return subprocess.run([sys.executable, "-m", "twig_batch.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_documented_submit_line_runs_on_a_token_cluster(token_head, tmp_path):
    dashboard, _, env = token_head
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["TWIG_BATCH_CACHE"] = os.environ["TWIG_BATCH_CACHE"]  # the test run's cache
    runtime_env["env_vars"]["HF_HOME"] = str(tmp_path / "hf")
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    dest = tmp_path / "job-output"

    documented = documented_submit_line()
    prefix = [word for word in documented[:documented.index("ray")] if "=" in word]
    assert prefix == ["RAY_AUTH_MODE=token"], documented  # Ray's CLI sends the token only when told to
    entrypoint = documented[documented.index("--") + 1:]
    assert entrypoint[:2] == ["python", "jobs/generate_batch.py"] and (REPO / entrypoint[1]).is_file()
    command = ["ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--runtime-env",
               str(tmp_path / "runtime_env.yaml"), "--", "python", "jobs/generate_batch.py",
               "examples/prompts.parquet", "--output", str(dest), "--samples-per-prompt", "1", "--images-per-call", "8",
               "--model", "tiny-micro"]
    result = subprocess.run(command, cwd=REPO, env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output and "manifest: " in output and "(16 ok, 0 error rows)" in output

    rows = read_manifest(dest).to_pylist()
    assert len(rows) == 16 and {r["status"] for r in rows} == {"ok"}
    assert all(Path(r["image_uri"]).is_file() for r in rows)
    assert (dest / "_COMPLETE.json").is_file() and (dest / "run.json").is_file()


def test_without_the_documented_prefix_ray_refuses_the_submission(token_head):
    dashboard, _, env = token_head
    result = subprocess.run(["ray", "job", "list", "--address", dashboard], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "Missing authentication token" in result.stdout + result.stderr


def test_twig_batch_run_joins_a_token_cluster_by_itself(token_head, tmp_path):
    """No Ray variables, as the README shows: the run finds the head and its token."""
    _, _, env = token_head
    prompts = write_prompts(tmp_path / "p.parquet", 3)
    result = run_cli(["run", prompts, "-o", tmp_path / "out", "--model", "tiny-micro"], env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "(3 ok, 0 error rows)" in output


@pytest.mark.parametrize("case", ["auth disabled here", "no token here", "another token here"])
def test_an_auth_mismatch_is_one_line(token_head, tmp_path, case):
    _, gcs, env = token_head
    env = dict(env, RAY_ADDRESS=gcs)
    if case == "auth disabled here":
        env["RAY_AUTH_MODE"] = "disabled"
        expected = "has token authentication on, but RAY_AUTH_MODE=disabled here"
    elif case == "no token here":
        env["HOME"] = str(tmp_path)
        expected = "has token authentication on and this machine has no token: copy ~/.ray/auth_token"
    else:
        env["RAY_AUTH_TOKEN"] = "0" * 64
        expected = "refused this machine's token"
    prompts = write_prompts(tmp_path / "p.parquet", 2)
    result = run_cli(["run", prompts, "-o", tmp_path / "out", "--model", "tiny-micro"], env, timeout=120)
    assert result.returncode == 2
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the Ray cluster at ") and expected in lines[0], lines
    assert not (tmp_path / "out" / "run.json").exists()
