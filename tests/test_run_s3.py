"""The batch job from S3 to S3 (moto's S3 server on 127.0.0.1), on a real local Ray cluster."""
import io
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from batch_support import ACCESS_KEY, SECRET_KEY, s3_client, upload_parquet, write_prompts
from twig_batch.cli import app

runner = CliRunner()
# The local test's run at a quarter of its size, to S3 (on the micro model: storage is the point here): 100
# images in four parts of 25, two per actor. The 400-image bookkeeping is test_run_local.py's.
PROMPTS = 50


@pytest.fixture(scope="module")
def s3_run(shared_ray_s3, tmp_path_factory):
    client = s3_client()
    client.create_bucket(Bucket="prompts")
    client.create_bucket(Bucket="results")
    table_path = write_prompts(tmp_path_factory.mktemp("s3") / "p.parquet", PROMPTS)
    import pyarrow.parquet as pq

    source = upload_parquet("prompts", "batches/2026/p.parquet", pq.read_table(table_path))
    args = ["run", "s3://prompts/batches/2026/", "--output", "s3://results/runs/first", "--actors", 2,
            "--samples-per-prompt", 2, "--images-per-call", 25, "--model", "tiny-micro"]
    first = runner.invoke(app, list(map(str, args)))
    objects_after_first = _objects("results")
    second = runner.invoke(app, list(map(str, args + ["--resume"])))
    return source, first, objects_after_first, second, _objects("results")


def _objects(bucket):
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}


def _get(key, bucket="results"):
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def test_s3_run_writes_manifest_images_and_marker(s3_run):
    import pyarrow.parquet as pq

    _, first, objects, _, _ = s3_run
    assert first.exit_code == 0, first.output
    manifest = pq.read_table(io.BytesIO(_get("runs/first/manifest.parquet"))).to_pylist()
    assert len(manifest) == PROMPTS * 2 and {r["status"] for r in manifest} == {"ok"}
    assert len({(r["id"], r["sample_index"]) for r in manifest}) == PROMPTS * 2
    for r in manifest:
        assert r["image_uri"].startswith("s3://results/runs/first/images/")
        key = r["image_uri"].removeprefix("s3://results/")
        assert key in objects
        for uri in r["stage_image_uris"]:
            assert uri.removeprefix("s3://results/") in objects
    for r in manifest[:25]:
        image = Image.open(io.BytesIO(_get(r["image_uri"].removeprefix("s3://results/"))))
        image.load()
        assert image.format == "PNG" and image.size == (24, 24)
    assert {"runs/first/run.json", "runs/first/_COMPLETE.json"} <= set(objects)
    assert not [k for k in objects if "manifest-journal" in k or "write-probe" in k]
    assert f"manifest: s3://results/runs/first/manifest.parquet ({PROMPTS * 2} ok, 0 error rows)" in first.output


def test_s3_resume_draws_nothing(s3_run):
    _, _, before, second, after = s3_run
    assert second.exit_code == 0, second.output
    assert f"done: 0 image(s) drawn, 0 error(s), {PROMPTS * 2} skipped" in second.output
    images_before = {k: v for k, v in before.items() if "/images/" in k}
    assert {k: v for k, v in after.items() if "/images/" in k} == images_before


def test_no_credentials_in_any_record(s3_run):
    source, first, _, second, after = s3_run
    info = json.loads(_get("runs/first/run.json"))
    assert info["input"]["first_files"] == [source] and info["output"] == "s3://results/runs/first"
    texts = [_get(k) for k in after if not k.endswith(".png")]
    texts += [first.output.encode(), second.output.encode()]
    for blob in texts:
        assert SECRET_KEY.encode() not in blob and ACCESS_KEY.encode() not in blob
