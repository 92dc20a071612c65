"""A `ray start` cluster with token authentication off, on a machine where an earlier cluster left a
token in ~/.ray/auth_token (cluster/README.md's path): `twig-batch run` with no Ray variables joins it
in its mode, and a driver told the other mode says so in one line. The token-on cluster is in
test_job_submit.py."""
import subprocess
import sys
from pathlib import Path

import pytest

from batch_support import cluster_auth_mode, ray_head, read_manifest, write_prompts

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
    assert {r["status"] for r in read_manifest(tmp_path / "out").to_pylist()} == {"ok"}


def test_token_mode_against_an_open_cluster_is_one_line(open_head, tmp_path):
    _, gcs, env = open_head
    prompts = write_prompts(tmp_path / "p.parquet", 2)
    result = run_cli(["run", prompts, "-o", tmp_path / "out", "--model", "tiny-micro"],
                     dict(env, RAY_ADDRESS=gcs, RAY_AUTH_MODE="token"), timeout=120)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "has token authentication off, but RAY_AUTH_MODE=token here" in lines[0]
