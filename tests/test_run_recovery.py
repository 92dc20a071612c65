"""Crashes: the driver is killed mid-run (twice), then resumed; each (id, sample) ends up recorded once.

A destination that holds a run is never written to again without --resume, finished or not.
"""
import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from batch_support import read_manifest, write_prompts
from twig_batch.cli import app
from twig_batch.distributed.verify_run import verify_run

PROMPTS = 96  # on the micro model: seconds of drawing, so each killed driver is still drawing when killed
RUN = ["--model", "tiny-micro", "--actors", "2"]  # every attempt the same run (the model is part of its identity)


@pytest.fixture(scope="module")
def ray_cluster(shared_ray):
    return shared_ray


def journal_parts(dest):
    folder = dest / "manifest-journal"
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def snapshot(dest):
    """Every file under dest with its bytes and modification time (nanoseconds)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dest.rglob("*") if p.is_file()}


def refused_without_resume(prompts, dest):
    before = snapshot(dest)
    result = CliRunner().invoke(app, ["run", str(prompts), "--output", str(dest), *RUN])
    assert result.exit_code == 2, result.output
    assert "already holds a twig-batch run; pass --resume" in result.output
    assert snapshot(dest) == before  # nothing rewritten, added or removed


def recorded_images(dest, keys):
    """Bytes and mtime of the PNGs (final and band images) of every recorded (id, sample)."""
    from twig_batch.io import layout

    files = {}
    for key in keys:
        prompt_id, _, sample = key.rpartition("\x1f")
        stem = dest / layout.sample_stem(prompt_id, int(sample))
        for path in stem.parent.glob(stem.name + ".*png"):  # sample-0000.png, sample-0000.stage-*.png
            files[path] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


def start_and_kill(ray_cluster, prompts, dest, extra, parts_before):
    """Run the CLI as its own driver on the shared cluster; SIGKILL it once it has flushed a new part."""
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    command = [sys.executable, "-m", "twig_batch.cli", "run", str(prompts), "--output", str(dest), *RUN,
               "--images-per-call", "4", "--journal-every", "4", *extra]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 480  # generous: CI machines may be busy
    while len(journal_parts(dest)) <= parts_before:
        assert driver.poll() is None, driver.stdout.read().decode()
        assert time.monotonic() < deadline, "no journal part was flushed"
        time.sleep(0.1)
    driver.kill()
    driver.wait(timeout=30)
    actors_gone(deadline)


def actors_gone(deadline: float) -> None:
    """Waits until Ray has ended the killed driver's model actors: until then one may still be
    writing the images of a call it had started, and a snapshot of the folder would race with it."""
    # The GCS's actor table: the shared cluster runs no dashboard, which Ray's state API would need.
    from ray._private import state

    while True:
        alive = [a["State"] for a in state.actors().values()
                 if a["ActorClassName"] == "ImageGenerator" and a["State"] != "DEAD"]
        if not alive:
            return
        assert time.monotonic() < deadline, f"the killed driver's model actors are still {alive}"
        time.sleep(0.2)


@pytest.mark.slow
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
    refused_without_resume(prompts, dest)  # an interrupted run is still a run
    before_resume = recorded_images(dest, recorded)
    assert len(before_resume) == 4 * len(recorded)  # the final image and three band images of each
    result = CliRunner().invoke(app, ["run", str(prompts), "--output", str(dest), *RUN, "--resume"])
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

    # What was recorded before the kills was skipped, not drawn again: same bytes, same mtime.
    assert recorded_images(dest, recorded) == before_resume
    report = verify_run(str(dest), str(prompts))
    assert report.ok, report.problems
    assert report.ok_rows == PROMPTS and report.duplicate_rows == 0 and report.missing_items == 0

    refused_without_resume(prompts, dest)  # and a finished one too
