"""The batch job end to end on a real local Ray cluster: tiny models, CPU, real Parquet and PNG files.

The 400-image run draws on the micro model (what it checks is the job's bookkeeping, not the
drawing: 16 times fewer image tokens per image); the mixed run draws on the default model.
"""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from batch_support import HOSTILE_IDS, read_manifest, write_prompts
from twig_batch.cli import app
from twig_batch.seeds import derive_seed

runner = CliRunner()
MANIFEST_COLUMNS = {"id", "prompt", "sample_index", "seed", "mode", "model", "status", "error", "image_uri",
                    "stage_image_uris", "thoughts", "reflection_scores", "redrawn_bands", "n_triggers",
                    "n_injections", "trigger_log_uri", "duration_s"}


@pytest.fixture(scope="module")
def ray_cluster(shared_ray):
    return shared_ray


def run(*args):
    result = runner.invoke(app, ["run", *map(str, args)])
    return result


def files_under(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def big_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    prompts = write_prompts(root / "prompts.parquet", 200)
    dest = root / "out"
    result = run(prompts, "--output", dest, "--model", "tiny-micro", "--actors", 2, "--samples-per-prompt", 2,
                 "--images-per-call", 25, "--progress-every", 1)
    return prompts, dest, result


def test_200_prompts_x_2_samples_over_2_actors(big_run):
    _, dest, result = big_run
    assert result.exit_code == 0, result.output
    manifest = read_manifest(dest)
    assert MANIFEST_COLUMNS <= set(manifest.column_names)
    rows = manifest.to_pylist()
    assert len(rows) == 400 and {r["status"] for r in rows} == {"ok"}
    assert len({(r["id"], r["sample_index"]) for r in rows}) == 400
    assert {r["sample_index"] for r in rows} == {0, 1}
    for r in rows:
        assert r["seed"] == derive_seed(0, r["id"], r["sample_index"])
        assert r["mode"] == "plain" and r["model"] == "tiny-micro" and r["error"] is None and r["duration_s"] > 0
        with Image.open(r["image_uri"]) as image:
            image.load()
            assert image.format == "PNG" and image.size == (24, 24) and image.mode == "RGB"
    pngs = list((dest / "images").rglob("sample-????.png"))  # final images (band images sit beside them)
    assert len(pngs) == 400
    assert len({p.read_bytes() for p in pngs[:40]}) == 40  # different seeds, different images


def test_progress_and_summary_are_printed(big_run):
    _, dest, result = big_run
    assert "200 prompts x 2 samples" in result.output
    progress = [line for line in result.output.splitlines() if line.startswith("progress:")]
    waiting = [line for line in progress if "waiting for the first" in line]
    drawing = progress[len(waiting):]  # the actors' start is said until the first rows arrive, then the rate
    assert all(line.startswith("progress: 0/400 images") for line in waiting)
    assert drawing and all("images/s" in line and "ETA" in line and "errors 0" in line for line in drawing)
    assert "/400 images" in progress[-1]
    assert "done: 400 image(s) drawn, 0 error(s)" in result.output
    assert f"images:   {dest / 'images'}" in result.output
    assert f"manifest: {dest / 'manifest.parquet'} (400 ok, 0 error rows)" in result.output


def test_run_record_and_completion_marker(big_run):
    prompts, dest, _ = big_run
    info = json.loads((dest / "run.json").read_text())
    assert info["status"] == "complete" and info["model"] == "tiny-micro" and info["mode"] == "plain"
    assert info["settings"]["cfg_weight"] == 5.0 and info["base_seed"] == 0 and info["samples_per_prompt"] == 2
    assert {"twig_batch", "torch", "transformers", "ray", "pyarrow", "python"} <= set(info["versions"])
    assert info["input"]["rows"] == 200 and info["input"]["first_files"] == [str(prompts)]
    assert info["totals"] == {"manifest_rows": 400, "manifest_ok": 400, "manifest_errors": 0, "error_causes": []}
    marker = dest / "_COMPLETE.json"
    assert json.loads(marker.read_text())["manifest_ok"] == 400
    others = files_under(dest)
    assert max(others.values()) == others[marker]  # the marker is the last thing written
    assert not list(dest.rglob("*.tmp")) and not (dest / "manifest-journal").exists()


def test_resume_of_a_finished_run_draws_nothing(big_run):
    prompts, dest, _ = big_run
    before = files_under(dest / "images")
    manifest_before = read_manifest(dest).to_pylist()
    result = run(prompts, "--output", dest, "--model", "tiny-micro", "--actors", 2, "--samples-per-prompt", 2,
                 "--resume")
    assert result.exit_code == 0, result.output
    assert "400 image(s) already done" in result.output
    assert "done: 0 image(s) drawn, 0 error(s), 400 skipped" in result.output
    assert files_under(dest / "images") == before  # not one image rewritten
    assert read_manifest(dest).to_pylist() == manifest_before
    info = json.loads((dest / "run.json").read_text())
    assert [a["resumed"] for a in info["attempts"]] == [False, True] and info["attempts"][1]["ok"] == 0


def test_rerun_without_resume_or_with_other_settings_is_refused(big_run):
    prompts, dest, _ = big_run
    result = run(prompts, "--output", dest)
    assert result.exit_code == 2 and "already holds a twig-batch run; pass --resume" in result.output
    result = run(prompts, "--output", dest, "--model", "tiny-micro", "--resume", "--seed", 7, "--samples-per-prompt", 2)
    assert result.exit_code == 2 and "cannot resume" in result.output and "base_seed" in result.output


@pytest.fixture(scope="module")
def mixed_run(ray_cluster, tmp_path_factory):
    """Hostile ids and bad prompts in one input, next to good rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("mixed")
    ids = HOSTILE_IDS + ["null-prompt", "empty-prompt", "blank-prompt", "fine"]
    prompts = [f"a cube {i}" for i in range(len(HOSTILE_IDS))] + [None, "", "   \n", "a fine cube"]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), root / "mixed.parquet")
    dest = root / "deep" / "dest"
    result = run(root / "mixed.parquet", "--output", dest, "--actors", 1, "--images-per-call", 8)
    return root, dest, result


def test_bad_prompts_become_error_rows_and_the_rest_succeeds(mixed_run):
    _, dest, result = mixed_run
    assert result.exit_code == 3, result.output  # finished, with row errors
    rows = {r["id"]: r for r in read_manifest(dest).to_pylist()}
    assert rows["null-prompt"]["status"] == "error" and "null" in rows["null-prompt"]["error"]
    assert rows["empty-prompt"]["status"] == "error" and "empty" in rows["empty-prompt"]["error"]
    assert rows["blank-prompt"]["status"] == "error" and "empty" in rows["blank-prompt"]["error"]
    for bad in ("null-prompt", "empty-prompt", "blank-prompt"):
        assert rows[bad]["image_uri"] is None
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == len(HOSTILE_IDS) + 1 and {r["model"] for r in ok} == {"tiny"}  # the default model
    assert "3 error(s)" in result.output


def test_hostile_ids_stay_inside_the_destination(mixed_run):
    root, dest, _ = mixed_run
    rows = {r["id"]: r for r in read_manifest(dest).to_pylist()}
    assert set(HOSTILE_IDS) <= set(rows)  # ids are recorded exactly as given
    for path in root.rglob("*"):
        if path.is_file() and path.name != "mixed.parquet":
            assert dest.resolve() in path.resolve().parents, path
    for prompt_id in HOSTILE_IDS:
        image = (dest / rows[prompt_id]["image_uri"]).resolve()
        assert (dest / "images").resolve() in image.parents and image.is_file()
    assert not (root / "etc").exists() and not (dest / "a").exists()
    assert len({rows[i]["image_uri"] for i in HOSTILE_IDS}) == len(HOSTILE_IDS)


def test_resume_redoes_error_rows_only(mixed_run):
    root, dest, _ = mixed_run
    ok_images = {r["image_uri"]: r["finished_at"] for r in read_manifest(dest).to_pylist() if r["status"] == "ok"}
    result = run(root / "mixed.parquet", "--output", dest, "--actors", 1, "--images-per-call", 8, "--resume")
    assert result.exit_code == 3, result.output
    assert "done: 0 image(s) drawn, 3 error(s)" in result.output
    rows = read_manifest(dest).to_pylist()
    assert len(rows) == len(HOSTILE_IDS) + 4 and sum(r["status"] == "error" for r in rows) == 3
    assert {r["image_uri"]: r["finished_at"] for r in rows if r["status"] == "ok"} == ok_images
