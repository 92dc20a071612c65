"""`twig-batch verify` on real outputs: one small clean run, then a copy of it per corruption."""
import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batch_support import read_manifest, s3_client, upload_parquet, write_prompts
from twig_batch.cli import app
from twig_batch.distributed.verify_run import verify_run
from twig_batch.io import verify as verify_module
from twig_batch.io.manifest import SCHEMA
from twig_batch.io.verify import verify_output

runner = CliRunner()
PROMPTS, SAMPLES = 8, 2
ITEMS = PROMPTS * SAMPLES


@pytest.fixture(scope="module")
def cluster(shared_ray_s3):
    return shared_ray_s3


def run(prompts, output):
    # The micro model: what verify reads (rows, PNGs, markers) is the same at any image size.
    return runner.invoke(app, ["run", str(prompts), "--output", str(output), "--model", "tiny-micro",
                               "--samples-per-prompt", str(SAMPLES), "--images-per-call", "4"])


@pytest.fixture(scope="module")
def clean(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    prompts = write_prompts(root / "prompts.parquet", PROMPTS)
    result = run(prompts, root / "out")
    assert result.exit_code == 0, result.output
    return prompts, root / "out"


@pytest.fixture
def copy(clean, tmp_path):
    """A private copy of the clean run; its manifest still names the original folder, as a synced run would."""
    return shutil.copytree(clean[1], tmp_path / "copy")


def rows_of(dest):
    return read_manifest(dest).to_pylist()


def rewrite_manifest(dest, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), dest / "manifest.parquet")


def local(dest, uri):
    """Where a manifest URI (written for the original folder) lies in the copy."""
    return dest / uri.split("/out/", 1)[1]


def test_clean_run_passes(clean):
    prompts, dest = clean
    result = runner.invoke(app, ["verify", str(dest), "--input", str(prompts)])
    assert result.exit_code == 0, result.output
    assert "ok: no problems found" in result.output
    assert f"{ITEMS} in the manifest, 0 in the journal, 0 duplicate" in result.output
    assert f"input:   {ITEMS} expected, 0 missing, 0 unexpected" in result.output
    report = verify_run(str(dest), str(prompts))
    stages = sum(len(r["stage_image_uris"]) for r in rows_of(dest))
    assert report.ok and report.complete and report.problems == []
    assert (report.manifest_rows, report.ok_rows, report.error_rows) == (ITEMS, ITEMS, 0)
    assert report.images_checked == ITEMS + stages and stages > 0


def test_clean_run_passes_as_a_module(clean):
    prompts, dest = clean
    done = subprocess.run([sys.executable, "-m", "twig_batch.cli", "verify", str(dest), "--input", str(prompts)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: no problems found" in done.stdout


def test_a_copied_run_is_checked_in_its_new_place(copy):
    assert verify_output(str(copy)).ok
    shutil.rmtree(copy / "images")  # the original still has every image; the copy must not be excused by it
    report = verify_output(str(copy))
    assert not report.ok and report.problem_count == ITEMS * 4  # final image + 3 band images each


def test_deleted_image(copy):
    row = rows_of(copy)[3]
    local(copy, row["image_uri"]).unlink()
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1
    assert "1 problem(s):" in result.output
    assert f"(id={row['id']!r}, sample={row['sample_index']}): image" in result.output
    assert "does not exist" in result.output


def test_truncated_and_garbage_pngs(copy):
    rows = rows_of(copy)
    truncated, garbage = local(copy, rows[1]["image_uri"]), local(copy, rows[6]["stage_image_uris"][0])
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    report = verify_output(str(copy))
    assert report.problem_count == 2, report.problems
    first, second = report.problems
    assert f"(id={rows[1]['id']!r}, sample={rows[1]['sample_index']}): image" in first and "unreadable" in first
    assert f"(id={rows[6]['id']!r}, sample={rows[6]['sample_index']}): stage image 0" in second
    assert "unreadable" in second


def test_duplicated_rows_in_the_manifest_and_across_the_journal(copy):
    rows = rows_of(copy)
    rewrite_manifest(copy, rows + [rows[5]])
    report = verify_output(str(copy))
    key = f"(id={rows[5]['id']!r}, sample={rows[5]['sample_index']})"
    assert f"duplicate row {key}: twice in manifest.parquet" in report.problems
    assert report.duplicate_rows == 1 and report.ok_rows == ITEMS
    assert any("counts 16 manifest rows, manifest.parquet holds 17" in p for p in report.problems)

    rewrite_manifest(copy, rows)
    (copy / "manifest-journal").mkdir()
    pq.write_table(pa.Table.from_pylist([rows[2]], schema=SCHEMA), copy / "manifest-journal" / "late-000000.parquet")
    report = verify_output(str(copy))
    key = f"(id={rows[2]['id']!r}, sample={rows[2]['sample_index']})"
    assert f"duplicate row {key}: recorded ok again in manifest-journal/late-000000.parquet" in report.problems
    assert any("1 journal part(s) were never folded" in p for p in report.problems)


def test_an_error_row_retried_in_the_journal_is_not_a_duplicate(copy):
    rows = rows_of(copy)
    failed = dict(rows[0], status="error", error="generation failed", image_uri=None, stage_image_uris=[])
    rewrite_manifest(copy, [failed] + rows[1:])
    (copy / "manifest-journal").mkdir()
    pq.write_table(pa.Table.from_pylist([rows[0]], schema=SCHEMA), copy / "manifest-journal" / "retry-000000.parquet")
    (copy / "_COMPLETE.json").unlink()  # the resume that retried it is still running
    report = verify_output(str(copy))
    assert report.duplicate_rows == 0 and (report.ok_rows, report.error_rows) == (ITEMS, 0)
    assert report.problem_count == 1 and report.problems[0].startswith("not complete")


def test_missing_stage_image(copy):
    row = rows_of(copy)[9]
    local(copy, row["stage_image_uris"][2]).unlink()
    report = verify_output(str(copy))
    assert report.problem_count == 1
    assert f"(id={row['id']!r}, sample={row['sample_index']}): stage image 2" in report.problems[0]
    assert "does not exist" in report.problems[0]


def test_missing_completion_marker(copy):
    (copy / "_COMPLETE.json").unlink()
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1
    assert "not complete: no _COMPLETE.json (run.json status 'complete')" in result.output


def test_marker_disagreeing_with_run_json(copy):
    info = json.loads((copy / "run.json").read_text())
    info["status"] = "running"
    (copy / "run.json").write_text(json.dumps(info))
    report = verify_output(str(copy))
    assert not report.complete
    assert report.problems == ["_COMPLETE.json is present but run.json status is 'running'"]


def test_partial_run_with_only_journal_parts(copy):
    (copy / "manifest-journal").mkdir()
    (copy / "manifest.parquet").rename(copy / "manifest-journal" / "20260101T000000Z-abc123-000000.parquet")
    (copy / "_COMPLETE.json").unlink()
    report = verify_output(str(copy))
    assert (report.manifest_rows, report.journal_rows, report.ok_rows) == (0, ITEMS, ITEMS)
    assert report.images_checked > ITEMS and report.problem_count == 1 and "not complete" in report.problems[0]


def test_input_with_prompts_not_generated_and_rows_not_in_the_input(clean, tmp_path):
    _, dest = clean
    more = write_prompts(tmp_path / "more.parquet", PROMPTS + 2)
    report = verify_run(str(dest), str(more))
    assert (report.expected_items, report.missing_items, report.unexpected_items) == (ITEMS + 4, 4, 0)
    assert "missing (id='p0009', sample=1): in the input, not in the manifest" in report.problems
    assert sum(p.startswith("missing (id='p0008'") for p in report.problems) == SAMPLES
    fewer = write_prompts(tmp_path / "fewer.parquet", PROMPTS - 1)
    result = runner.invoke(app, ["verify", str(dest), "--input", str(fewer)])
    assert result.exit_code == 1
    assert f"{ITEMS - 2} expected, 0 missing, 2 unexpected" in result.output
    assert "unexpected (id='p0007', sample=0): in the manifest, not in the input" in result.output


def test_rows_pointing_outside_dest_or_at_another_items_object(copy, tmp_path):
    rows = rows_of(copy)
    elsewhere = tmp_path / "elsewhere.png"
    shutil.copyfile(local(copy, rows[0]["image_uri"]), elsewhere)  # a perfectly good PNG, in the wrong place
    rows[0]["image_uri"] = str(elsewhere)
    rows[1]["image_uri"] = f"{copy.resolve()}/images/../../elsewhere.png"
    rows[2]["trigger_log_uri"] = "s3://other-bucket/run/x.triggers.parquet"
    rows[3]["image_uri"] = rows[4]["image_uri"]  # inside DEST, but another item's image
    rewrite_manifest(copy, rows)
    report = verify_output(str(copy))
    assert report.problem_count == 4, report.problems
    for index, what in ((0, "image"), (1, "image"), (2, "trigger log")):
        key = f"(id={rows[index]['id']!r}, sample={rows[index]['sample_index']}): {what}"
        assert any(p.startswith(key) and p.endswith("is outside DEST") for p in report.problems)
    assert any(p.startswith(f"(id={rows[3]['id']!r}") and "not this item's key" in p for p in report.problems)


def test_many_problems_are_capped_and_counted(copy, monkeypatch):
    monkeypatch.setattr(verify_module, "PROBLEMS_PER_KIND", 5)
    for row in rows_of(copy):
        local(copy, row["image_uri"]).unlink()
    report = verify_output(str(copy))
    assert report.problem_count == ITEMS and len(report.problems) == 6
    assert report.problems[-1] == f"... and {ITEMS - 5} more: image missing"


def test_a_folder_that_is_no_run_is_an_error(tmp_path):
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 2 and "holds no twig-batch run" in result.output


def test_s3_output(cluster, tmp_path):
    client = s3_client()
    client.create_bucket(Bucket="verify-in")
    client.create_bucket(Bucket="verify-out")
    source = upload_parquet("verify-in", "p.parquet", pq.read_table(write_prompts(tmp_path / "p.parquet", 4)))
    result = run(source, "s3://verify-out/runs/one")
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", "s3://verify-out/runs/one", "--input", source])
    assert result.exit_code == 0, result.output
    assert "input:   8 expected, 0 missing, 0 unexpected" in result.output
    manifest = pq.read_table(pa.BufferReader(client.get_object(
        Bucket="verify-out", Key="runs/one/manifest.parquet")["Body"].read())).to_pylist()
    gone = manifest[5]
    client.delete_object(Bucket="verify-out", Key=gone["image_uri"].removeprefix("s3://verify-out/"))
    report = verify_output("s3://verify-out/runs/one")
    assert report.problems == [f"(id={gone['id']!r}, sample={gone['sample_index']}): image {gone['image_uri']} "
                               "does not exist"]


def test_a_row_without_a_usable_key(copy):
    rows = rows_of(copy)
    rows[7]["id"] = None
    rewrite_manifest(copy, rows)
    report = verify_output(str(copy))
    assert report.problems == ["a row in manifest.parquet has no usable key (id=None, sample=1)"]
