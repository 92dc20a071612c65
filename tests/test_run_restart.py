"""A failed run does not poison its folder: a run that recorded no image restarts with any options,
with or without --resume; --overwrite replaces a run that did; --resume keeps refusing other settings."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from batch_support import read_manifest, write_prompts
from twig_batch.cli import app
from twig_batch.distributed.verify_run import verify_run


@pytest.fixture(scope="module")
def ray_cluster(shared_ray):
    return shared_ray


@pytest.fixture(scope="module")
def failed_run(ray_cluster, tmp_path_factory):
    """A first run whose model cannot load on the actors (its weights are not a safetensors file): it
    fails after run.json is written, having drawn nothing."""
    from twig_batch.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("failed")
    broken = make_tiny_model(root / "broken-model", grid=6)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
    prompts = write_prompts(root / "p.parquet", 3)
    dest = root / "out"
    result = run(prompts, dest, "--model", broken)
    assert result.exit_code == 2 and "error:" in result.output, result.output
    assert json.loads((dest / "run.json").read_text())["model"] == str(broken)
    return prompts, dest


def run(prompts, dest, *options):
    return CliRunner().invoke(app, ["run", str(prompts), "--output", str(dest), "--actors", "1", *map(str, options)])


def copy_of(dest, tmp_path):
    shutil.copytree(dest, tmp_path / "out")
    return tmp_path / "out"


@pytest.mark.parametrize("resume", [False, True], ids=["plain rerun", "--resume"])
def test_a_run_that_drew_nothing_restarts_with_the_right_model(failed_run, tmp_path, resume):
    prompts, failed = failed_run
    dest = copy_of(failed, tmp_path)
    result = run(prompts, dest, "--model", "tiny-micro", *(["--resume"] if resume else []))
    assert result.exit_code == 0, result.output
    assert f"replacing the earlier run in {dest}: it recorded no image" in result.output
    info = json.loads((dest / "run.json").read_text())
    assert info["model"] == "tiny-micro" and len(info["attempts"]) == 1 and info["status"] == "complete"
    assert info["attempts"][0]["replaced"].startswith("it recorded no image")
    assert {r["status"] for r in read_manifest(dest).to_pylist()} == {"ok"}
    assert verify_run(str(dest), str(prompts)).ok


def test_a_run_with_images_is_refused_without_resume_and_replaced_with_overwrite(ray_cluster, tmp_path):
    first = write_prompts(tmp_path / "first.parquet", 2, prefix="old")
    dest = tmp_path / "out"
    assert run(first, dest, "--model", "tiny-micro").exit_code == 0
    old_images = sorted((dest / "images").rglob("*.png"))
    assert old_images

    second = write_prompts(tmp_path / "second.parquet", 3, prefix="new")
    refused = run(second, dest, "--model", "tiny-micro", "--seed", "5")
    assert refused.exit_code == 2
    assert "already holds a twig-batch run; pass --resume to continue it (2 image(s) recorded), --overwrite to " \
           "replace it" in refused.output
    other_settings = run(second, dest, "--model", "tiny-micro", "--seed", "5", "--resume")
    assert other_settings.exit_code == 2 and "cannot resume" in other_settings.output
    assert "--overwrite to replace the run" in other_settings.output
    both = run(second, dest, "--model", "tiny-micro", "--resume", "--overwrite")
    assert both.exit_code == 2 and "pass one" in both.output

    replaced = run(second, dest, "--model", "tiny-micro", "--seed", "5", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert "replacing the earlier run" in replaced.output and "--overwrite (2 image(s) recorded; all removed)" \
        in replaced.output
    assert not any(path.exists() for path in old_images)
    rows = read_manifest(dest).to_pylist()
    assert sorted(r["id"] for r in rows) == ["new0000", "new0001", "new0002"]
    info = json.loads((dest / "run.json").read_text())
    assert info["base_seed"] == 5 and len(info["attempts"]) == 1
    assert verify_run(str(dest), str(second)).ok
