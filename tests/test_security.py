"""Hostile ids never become paths, nothing is written outside DEST, credentials never reach an output or a log."""
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batch_support import (ACCESS_KEY, HOSTILE_IDS, SECRET_KEY, read_manifest, s3_client, strict_s3_server,
                           upload_parquet)
from twig_batch.cli import app
from twig_batch.io import layout
from twig_batch.io.s3 import S3Endpoint
from twig_batch.io.storage import LocalStorage, S3Storage

runner = CliRunner()
HOSTILE_PROMPT = "../../../tmp/escaped-by-prompt"  # a row without an id: its id is made from this prompt
SECRETS = (SECRET_KEY.encode(), ACCESS_KEY.encode())
FOLDER = re.compile(r"^(?![.])[A-Za-z0-9._-]{1,40}-[0-9a-f]{20}$")
# Paths, keys and logs are the point, not the drawing: the micro model, 16 times fewer tokens an image.
MICRO = ["--model", "tiny-micro", "--images-per-call", "8"]
FILE = re.compile(r"^sample-\d{4}(\.stage-\d{2}-[A-Za-z0-9._-]{1,40})?\.png$|^sample-\d{4}\.triggers\.parquet$")


def hostile_table() -> pa.Table:
    ids = HOSTILE_IDS + [None]
    prompts = [f"a cube number {i}" for i in range(len(HOSTILE_IDS))] + [HOSTILE_PROMPT]
    return pa.table({"id": ids, "prompt": prompts})


@pytest.fixture(scope="module")
def cluster(shared_ray, shared_ray_s3):
    """Ray's log folder, if found (the cluster's workers have the S3 server's variables, keys included)."""
    try:
        return Path(shared_ray._private.worker.global_worker.node.get_logs_dir_path())
    except Exception:  # a private API: the log scan is skipped when it moves
        return None


@pytest.fixture(scope="module")
def local_run(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    source = root / "input" / "ids.parquet"
    source.parent.mkdir()
    pq.write_table(hostile_table(), source)
    dest = root / "deep" / "dest"
    result = runner.invoke(app, ["run", str(source), "--output", str(dest), *MICRO])
    assert result.exit_code == 0, result.output
    return root, source, dest


@pytest.fixture(scope="module")
def s3_run(cluster, tmp_path_factory):
    client = s3_client()
    for bucket in ("secure-in", "secure-out"):
        client.create_bucket(Bucket=bucket)
    source = upload_parquet("secure-in", "ids.parquet", hostile_table().slice(0, 5))
    result = runner.invoke(app, ["run", source, "--output", "s3://secure-out/runs/one", *MICRO])
    assert result.exit_code == 0, result.output
    return result


def test_every_file_written_is_inside_dest(local_run):
    root, source, dest = local_run
    outside = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name).resolve()
            if path != source.resolve() and dest.resolve() not in path.parents:
                outside.append(path)
    assert outside == []
    assert sorted(p.name for p in root.iterdir()) == ["deep", "input"]
    assert not list(root.rglob("escaped-by-prompt*")) and not any(p.is_symlink() for p in root.rglob("*"))


def test_image_folders_are_slugs_plus_hashes(local_run):
    _, _, dest = local_run
    rows = read_manifest(dest).to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert set(HOSTILE_IDS) <= set(by_id) and all(r["status"] == "ok" for r in rows)  # ids recorded as given
    for prompt_id in HOSTILE_IDS:
        assert by_id[prompt_id]["image_uri"] == str(dest.resolve() / layout.image_key(prompt_id, 0))
    folders = set()
    for path in (dest / "images").rglob("*"):
        parts = path.relative_to(dest / "images").parts
        if len(parts) == 1:
            assert re.fullmatch(r"[0-9a-f]{2}", parts[0]) and path.is_dir()
        elif len(parts) == 2:
            assert FOLDER.match(parts[1]) and parts[1][-20:-18] == parts[0] and path.is_dir()
            folders.add(parts[1])
        else:
            assert len(parts) == 3 and FILE.match(parts[2]) and path.is_file(), path
    assert len(folders) == len(rows)
    assert len({name.lower() for name in folders}) == len(folders)  # CON and con apart on any filesystem
    derived = next(r for r in rows if r["prompt"] == HOSTILE_PROMPT)
    assert derived["id"].startswith("p-") and "escaped" not in derived["image_uri"]


def test_s3_keys_stay_under_the_prefix(s3_run):
    keys = [o["Key"] for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket="secure-out")
            for o in page.get("Contents", [])]
    assert keys and all(k.startswith("runs/one/") for k in keys)
    for key in keys:
        parts = key.removeprefix("runs/one/").split("/")
        assert ".." not in parts and "" not in parts and "." not in parts
        if parts[0] == "images":
            assert len(parts) == 4 and FOLDER.match(parts[2]) and FILE.match(parts[3]), key


def test_no_credentials_in_outputs_or_output_text(s3_run):
    client = s3_client()
    for bucket in ("secure-out", "secure-in"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                blob = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                assert not any(secret in blob for secret in SECRETS), item["Key"]
    assert {"runs/one/run.json", "runs/one/manifest.parquet", "runs/one/_COMPLETE.json"} <= {
        o["Key"] for o in client.list_objects_v2(Bucket="secure-out")["Contents"]}
    assert not any(secret.decode() in s3_run.output for secret in SECRETS)


def test_no_credentials_in_ray_logs(cluster, s3_run):
    if cluster is None or not cluster.is_dir():
        pytest.skip("Ray's log folder is not reachable from this Ray version")
    scanned = 0
    for path in cluster.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            scanned += 1
            assert not any(secret in blob for secret in SECRETS), path
    assert scanned > 0


def test_refused_credentials_are_not_echoed(tmp_path, monkeypatch):
    source = tmp_path / "p.parquet"
    pq.write_table(hostile_table().slice(0, 2), source)
    with strict_s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for args in (["run", str(source), "--output", "s3://locked/run"],
                     ["run", "s3://locked/in.parquet", "--output", str(tmp_path / "out")],
                     ["verify", "s3://locked/run"]):
            result = runner.invoke(app, args)
            assert result.exit_code == 2, result.output
            assert "credentials were refused" in result.output
            assert SECRET_KEY not in result.output and ACCESS_KEY not in result.output


def test_credentials_in_an_address_are_refused_without_echo(tmp_path):
    source = tmp_path / "p.parquet"
    pq.write_table(hostile_table().slice(0, 2), source)
    address = f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/run"
    for args in (["run", str(source), "--output", address], ["run", address, "--output", str(tmp_path / "out")],
                 ["verify", address]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "holds only the bucket and prefix" in result.output
        assert SECRET_KEY not in result.output and ACCESS_KEY not in result.output
    assert not (tmp_path / "out").exists()


UNSAFE_KEYS = ["..", "../x", "a/../../b", "/etc/passwd", "", ".", "./a", "a//b", "a/", "images/.."]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_local_storage_refuses_unsafe_keys(key, tmp_path):
    store = LocalStorage(tmp_path / "dest")
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key),
                 lambda: store.list(key), lambda: store.delete(key), lambda: store.uri(key)):
        with pytest.raises(ValueError, match="unsafe storage key"):
            call()
    assert list(tmp_path.rglob("*")) == []


class RefusingClient:
    """Stands in for boto3's client: any S3 call made through it fails the test."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: pytest.fail(f"S3 {name} was called")


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_s3_storage_refuses_unsafe_keys_before_any_request(key):
    store = S3Storage("s3://bucket/prefix", endpoint=S3Endpoint(None, None))
    store._client = RefusingClient()
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key),
                 lambda: store.list(key), lambda: store.delete(key), lambda: store.uri(key)):
        with pytest.raises(ValueError, match="unsafe storage key"):
            call()
