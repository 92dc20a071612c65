"""Whole runs under injected faults: failing S3 writes, a straggling actor, actors that keep dying."""
import io
import json
import time

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batch_support import read_manifest, s3_client, write_prompts
from twig_batch.cli import app
from twig_batch.distributed import faults
from twig_batch.distributed.verify_run import verify_run

pytestmark = pytest.mark.slow  # each run waits out its faults: a minute or more
runner = CliRunner()


@pytest.fixture(scope="module")
def cluster(shared_ray_s3):
    s3_client().create_bucket(Bucket="faulty")


def run(*args):
    return runner.invoke(app, ["run", *map(str, args)])


def unique_ok_rows(rows):
    return len({(r["id"], r["sample_index"]) for r in rows if r["status"] == "ok"})


def test_a_tenth_of_s3_writes_failing_transiently(cluster, tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", 120)
    state = tmp_path / "state"
    plan = tmp_path / "faults.json"
    plan.write_text(json.dumps({"storage_failure_rate": 0.1, "storage_failure_kind": "throttle", "seed": 4,
                                "state_dir": str(state)}))
    result = run(prompts, "--output", "s3://faulty/run", "--model", "tiny-micro", "--actors", 2, "--images-per-call", 20,
                 "--faults", plan)
    assert result.exit_code == 0, result.output
    assert "done: 120 image(s) drawn, 0 error(s)" in result.output

    injected = faults.markers(state, faults.STORAGE_FAILURES_DIR)
    puts = 120 * 4  # each image: three band images and the final one
    assert 0.03 * puts < len(injected) < 0.2 * puts, len(injected)
    assert {f["kind"] for f in injected} == {"throttle"}

    manifest = pq.read_table(io.BytesIO(s3_client().get_object(Bucket="faulty", Key="run/manifest.parquet")["Body"]
                                        .read())).to_pylist()
    assert len(manifest) == 120 and unique_ok_rows(manifest) == 120
    report = verify_run("s3://faulty/run", str(prompts))
    assert report.ok, report.problems
    assert report.images_checked == puts and report.missing_items == 0  # band images are checked too
    info = json.loads(s3_client().get_object(Bucket="faulty", Key="run/run.json")["Body"].read())
    assert info["attempts"][0]["faults"]["storage_failure_rate"] == 0.1


def test_a_straggling_actor_set_from_the_environment(cluster, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.parquet", 120)
    state, dest = tmp_path / "state", tmp_path / "out"
    monkeypatch.setenv(faults.ENV_VAR, json.dumps({"actor_delay_s": 1.0, "delayed_actors": 1,
                                                   "state_dir": str(state)}))
    result = run(prompts, "--output", dest, "--model", "tiny-micro", "--actors", 2, "--images-per-call", 8)
    assert result.exit_code == 0, result.output
    assert "fault injection is on" in result.output and "done: 120 image(s) drawn, 0 error(s)" in result.output

    delays = faults.markers(state, faults.DELAYS_DIR)
    assert delays and {d["start"] for d in delays} == {0}  # only the first actor to start was slowed
    rows = read_manifest(dest).to_pylist()
    assert len(rows) == 120 and unique_ok_rows(rows) == 120
    report = verify_run(str(dest), str(prompts))
    assert report.ok, report.problems
    info = json.loads((dest / "run.json").read_text())
    assert info["attempts"][0]["faults"]["actor_delay_s"] == 1.0


def test_work_waits_for_a_free_actor_instead_of_queuing_behind_a_busy_one(cluster, tmp_path):
    # Two calls of 8 images, two actors. The first actor to start is ready a few seconds before the other,
    # and each of its calls takes 30 s. The second call must go to the late actor once it is ready, not
    # wait on the busy first actor (which would leave the late actor, a GPU, idle with work waiting).
    prompts = write_prompts(tmp_path / "p.parquet", 16)
    state, dest = tmp_path / "state", tmp_path / "out"
    plan = json.dumps({"start_delay_s": 5, "actor_delay_s": 30, "delayed_actors": 1, "state_dir": str(state)})
    result = run(prompts, "--output", dest, "--model", "tiny-micro", "--actors", 2, "--images-per-call", 8,
                 "--faults", plan)
    assert result.exit_code == 0, result.output
    stats = json.loads((dest / "run.json").read_text())["attempts"][0]["actor_stats"]
    assert sorted(actor["images"] for actor in stats.values()) == [8, 8], stats
    assert len(faults.markers(state, faults.DELAYS_DIR)) == 1  # the slow actor drew one call only


def test_actors_that_keep_dying_end_the_run_with_a_clear_error_then_resume_finishes(cluster, tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", 64)
    state, dest = tmp_path / "state", tmp_path / "out"
    crash_loop = json.dumps({"kill_worker_after_rows": 1, "max_kills": 1000, "state_dir": str(state)})
    common = [prompts, "--output", dest, "--model", "tiny-micro", "--actors", 2, "--images-per-call", 8]
    start = time.monotonic()
    result = run(*common, "--max-actor-restarts", 1, "--max-task-retries", 1, "--faults", crash_loop)
    assert time.monotonic() - start < 300  # bounded: the default (retry forever) would never return
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "model actors kept dying" in error[0] and "--max-actor-restarts" in error[0], error
    kills = faults.markers(state, faults.KILLS_DIR)
    assert 2 <= len(kills) <= 2 * (1 + 1)  # two actors, each started at most twice
    assert not (dest / "_COMPLETE.json").exists()

    result = run(*common, "--resume")
    assert result.exit_code == 0, result.output
    rows = read_manifest(dest).to_pylist()
    assert len(rows) == 64 and unique_ok_rows(rows) == 64
    report = verify_run(str(dest), str(prompts))
    assert report.ok, report.problems
    attempts = json.loads((dest / "run.json").read_text())["attempts"]
    assert "faults" in attempts[0] and "faults" not in attempts[1]


def test_a_dead_actors_call_goes_on_with_only_the_items_it_had_not_handed_back(cluster, tmp_path):
    # One call of 8 items drawn in parts of 2; the actor dies writing the 5th row (two parts handed back).
    prompts = write_prompts(tmp_path / "p.parquet", 8)
    state, dest = tmp_path / "state", tmp_path / "out"
    kill = json.dumps({"kill_worker_after_rows": 5, "kill_at_random": False, "max_kills": 1, "state_dir": str(state)})
    result = run(prompts, "--output", dest, "--model", "tiny-micro", "--actors", 1, "--images-per-call", 2,
                 "--work-batch-size", 8, "--faults", kill)
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "died drawing a call of 8 item(s)" in line]
    assert len(said) == 1 and "the 4 item(s) it had not handed back are sent again" in said[0], result.output
    attempt = json.loads((dest / "run.json").read_text())["attempts"][0]
    assert attempt["part_event_counts"] == {"actor_died": 1}
    # The restarted actor drew the four items left, not the whole call again.
    assert sorted(actor["images"] for actor in attempt["actor_stats"].values()) == [4, 4]
    rows = read_manifest(dest).to_pylist()
    assert len(rows) == 8 and unique_ok_rows(rows) == 8
