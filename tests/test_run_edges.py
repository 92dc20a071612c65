"""Runs at the edges, on one local Ray cluster: a run that finishes with error rows (exit status 3),
repeated prompts without ids (drawn once), and an S3 endpoint that refuses connections for a while."""
import io
import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batch_support import SHARED_CLUSTER, read_manifest, s3_client, write_prompts
from twig_batch.cli import app

runner = CliRunner()
MICRO = ["--model", "tiny-micro", "--actors", "1", "--images-per-call", "8"]


@pytest.fixture(scope="module")
def s3(shared_ray_s3):
    """The shared cluster's S3 server, which can refuse connections for a while (its workers were started
    with its variables, as Ray's workers inherit the environment they start with)."""
    s3_client().create_bucket(Bucket="edges")
    return SHARED_CLUSTER.s3


@pytest.fixture(scope="module")
def cluster(s3):
    yield


def run(*args):
    return runner.invoke(app, ["run", *map(str, args)])


@pytest.fixture(scope="module")
def finished_with_errors(cluster, tmp_path_factory):
    """No ids: three copies of one prompt across two files (a block alone cannot see them), and bad prompts."""
    root = tmp_path_factory.mktemp("row-errors")
    pq.write_table(pa.table({"prompt": ["a green cone", "a red cube", None]}), root / "a.parquet")
    pq.write_table(pa.table({"prompt": ["a red cube", "a red cube", "   "]}), root / "b.parquet")
    dest = root / "out"
    return dest, run(root, "--output", dest, *MICRO, "--samples-per-prompt", 2)


def test_a_run_with_error_rows_exits_3_and_names_the_causes(finished_with_errors):
    _, result = finished_with_errors
    assert result.exit_code == 3, result.output
    assert "done: 4 image(s) drawn, 4 error(s)" in result.output
    causes = next(line for line in result.output.splitlines() if line.startswith("error rows:"))
    assert causes == "error rows: 4 of 8: 2 x prompt is missing (null); 2 x prompt is empty (only whitespace)"
    assert "finished with 4 error row(s), more than allowed (none;" in result.output
    assert "rerun with --resume to retry them; exit status 3" in result.output


def test_verify_exits_3_on_error_rows_unless_allowed(finished_with_errors):
    dest = finished_with_errors[0]
    result = runner.invoke(app, ["verify", str(dest)])
    assert result.exit_code == 3, result.output
    assert "ok: no problems found" in result.output and "error rows: 4 of 8: 2 x prompt is missing" in result.output
    allowed = runner.invoke(app, ["verify", str(dest), "--max-errors", "50%"])
    assert allowed.exit_code == 0 and "accepted: 4 error row(s), within --max-errors 50%" in allowed.output
    assert runner.invoke(app, ["verify", str(dest), "--allow-errors"]).exit_code == 0
    assert runner.invoke(app, ["verify", str(dest), "--max-errors", "3"]).exit_code == 3


def test_repeated_prompts_without_ids_are_drawn_once(finished_with_errors):
    dest, result = finished_with_errors
    assert "twig-batch run: 4 prompts x 2 samples" in result.output
    assert "2 row(s) repeat the prompt of an earlier row without an id" in result.output
    rows = read_manifest(dest).to_pylist()
    assert len(rows) == 8 and sum(r["status"] == "ok" for r in rows) == 4
    assert len(list((dest / "images").rglob("sample-????.png"))) == 4  # no image drawn twice
    attempt = json.loads((dest / "run.json").read_text())["attempts"][0]
    assert attempt["repeated_prompts"] == {"rows": 2, "prompts": 1} and attempt["ok"] == 4


def test_a_short_s3_outage_is_waited_out_and_said(s3, tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", 32)
    outage = {}

    def refuse_once_images_arrive():  # the endpoint goes away mid-run, for longer than a few quick retries
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            listed = s3_client().list_objects_v2(Bucket="edges", Prefix="outage/images/")
            if listed.get("KeyCount"):
                outage["thread"] = s3.refuse_connections_for(6.0)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=refuse_once_images_arrive, daemon=True)
    watcher.start()
    result = run(prompts, "--output", "s3://edges/outage", *MICRO, "--images-per-call", 4, "--progress-every", 1,
                 "--faults", json.dumps({"part_delay_s": 0.4}))
    watcher.join()
    outage["thread"].join()
    assert result.exit_code == 0, result.output
    assert "done: 32 image(s) drawn, 0 error(s)" in result.output
    lines = result.output.splitlines()
    assert any("storage: writes are failing (EndpointConnectionError" in line for line in lines), result.output
    assert any(line.startswith("progress: ") and "writes retrying for" in line for line in lines), result.output
    assert any("storage: writes go through again" in line for line in lines), result.output
    info = json.loads(s3_client().get_object(Bucket="edges", Key="outage/run.json")["Body"].read())
    retries = info["attempts"][0]["storage_retries"]
    assert retries["retries"] >= 1 and retries["outages"] >= 1 and "EndpointConnectionError" in retries["last_error"]
    manifest = pq.read_table(io.BytesIO(s3_client().get_object(Bucket="edges", Key="outage/manifest.parquet")["Body"]
                                        .read()))
    assert manifest.num_rows == 32 and set(manifest.column("status").to_pylist()) == {"ok"}
