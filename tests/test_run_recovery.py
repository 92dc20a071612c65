"""Crashes: the driver is killed mid-run (twice), then resumed; each (id, sample) ends up recorded once."""
import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from batch_support import local_ray, read_manifest, write_prompts
from twig_batch.cli import app

PROMPTS = 32


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=4) as ray:
        yield ray


def journal_parts(dest):
    folder = dest / "manifest-journal"
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def start_and_kill(ray_cluster, prompts, dest, extra, parts_before):
    """Run the CLI as its own driver on the shared cluster; SIGKILL it once it has flushed a new part."""
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    command = [sys.executable, "-m", "twig_batch.cli", "run", str(prompts), "--output", str(dest), "--actors", "2",
               "--batch-size", "4", "--journal-every", "4", *extra]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 480  # generous: CI machines may be busy
    while len(journal_parts(dest)) <= parts_before:
        assert driver.poll() is None, driver.stdout.read().decode()
        assert time.monotonic() < deadline, "no journal part was flushed"
        time.sleep(0.1)
    driver.kill()
    driver.wait(timeout=30)


def test_crash_crash_resume(ray_cluster, tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", PROMPTS)
    dest = tmp_path / "out"
    start_and_kill(ray_cluster, prompts, dest, [], 0)
    assert not (dest / "_COMPLETE.json").exists() and not (dest / "manifest.parquet").exists()
    assert json.loads((dest / "run.json").read_text())["status"] == "running"
    start_and_kill(ray_cluster, prompts, dest, ["--resume"], len(journal_parts(dest)))
    assert not (dest / "_COMPLETE.json").exists()

    from twig_batch.io.manifest import ok_keys
    from twig_batch.io.storage import LocalStorage

    recorded = ok_keys(LocalStorage(dest))
    assert 0 < len(recorded) < PROMPTS
    result = CliRunner().invoke(app, ["run", str(prompts), "--output", str(dest), "--actors", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert f"{len(recorded)} image(s) already done" in result.output
    assert f"done: {PROMPTS - len(recorded)} image(s) drawn, 0 error(s), {len(recorded)} skipped" in result.output

    rows = read_manifest(dest).to_pylist()
    assert len(rows) == PROMPTS and len({(r["id"], r["sample_index"]) for r in rows}) == PROMPTS
    assert all(r["status"] == "ok" and (dest / r["image_uri"]).is_file() for r in rows)
    assert journal_parts(dest) == [] and (dest / "_COMPLETE.json").is_file()
    info = json.loads((dest / "run.json").read_text())
    assert [a["resumed"] for a in info["attempts"]] == [False, True, True] and info["status"] == "complete"
    assert "finished_at" not in info["attempts"][0] and "finished_at" in info["attempts"][2]
