"""Staged modes through the batch job, and `ImageGenerator` inside a user's own Ray Data pipeline."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from batch_support import read_manifest, write_prompts
from twig_batch.cli import app
from twig_batch.distributed import ImageGenerator
from twig_batch.seeds import derive_seed


@pytest.fixture(scope="module")
def ray_cluster(shared_ray):
    return shared_ray


def test_twig_mode_with_controller_records_everything(ray_cluster, tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", 4)
    dest = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(prompts), "--output", str(dest), "--mode", "twig", "--actors", "1",
                                      "--images-per-call", "4", "--set", "think_max_tokens=6", "--controller",
                                      "--controller-set", "force_every=100", "--deterministic"])
    assert result.exit_code == 0, result.output
    rows = read_manifest(dest).to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"} and {r["mode"] for r in rows} == {"twig"}
    for r in rows:
        assert len(r["thoughts"]) == 3 and len(r["reflection_scores"]) >= 3 and r["reflections_json"]
        assert len(r["stage_image_uris"]) == len(r["stage_labels"]) >= 3
        assert all(Image.open(uri).size[0] == 96 for uri in r["stage_image_uris"])
        log = pq.read_table(r["trigger_log_uri"])
        assert log.num_rows > 0 and r["n_triggers"] == sum(log.column("fired").to_pylist())
        assert r["n_injections"] == sum(log.column("injected").to_pylist()) and r["n_injections"] > 0
        assert r["trigger_log_uri"].rsplit("/", 1)[0] == r["image_uri"].rsplit("/", 1)[0]  # next to the image
    info = json.loads((dest / "run.json").read_text())
    assert info["settings"]["controller"]["force_every"] == 100 and info["settings"]["think_max_tokens"] == 6
    assert info["settings"]["deterministic"] is True


def test_twig_in_the_mixed_loop_through_the_batch_job_draws_what_the_lockstep_engine_draws(ray_cluster, tmp_path):
    """`loop=auto` runs twig on a GPU in the mixed loop; asked for here on the CPU, the run says so,
    records it per actor, and every image, thought, reflection and trigger log is the lockstep run's."""
    prompts = write_prompts(tmp_path / "p.parquet", 4)
    runs = {}
    for loop in ("mixed", "lockstep"):
        dest = tmp_path / loop
        result = CliRunner().invoke(app, ["run", str(prompts), "--output", str(dest), "--mode", "twig", "--actors", "1",
                                          "--set", "think_max_tokens=6", "--set", f"loop={loop}", "--controller",
                                          "--controller-set", "force_every=40"])
        assert result.exit_code == 0, result.output
        info = json.loads((dest / "run.json").read_text())
        assert [stats["loop"] for stats in info["attempts"][-1]["actor_stats"].values()] == [loop]
        said = "the mixed loop: each image" if loop == "mixed" else "every image of a part through each stage together"
        assert said in result.output
        runs[loop] = sorted(read_manifest(dest).to_pylist(), key=lambda r: r["id"])
    for mixed, lockstep in zip(runs["mixed"], runs["lockstep"]):
        assert mixed["status"] == lockstep["status"] == "ok"
        assert mixed["thoughts"] == lockstep["thoughts"] and mixed["reflections_json"] == lockstep["reflections_json"]
        assert mixed["n_injections"] == lockstep["n_injections"] > 0
        logs = [pq.read_table(run["trigger_log_uri"]).to_pydict() for run in (mixed, lockstep)]
        for column in ("band", "attempt", "step", "fired", "forced", "injected"):
            assert logs[0][column] == logs[1][column]
        for column in ("s_t", "delta_s", "var_s", "u_t"):  # float32 sums in another order
            assert logs[0][column] == pytest.approx(logs[1][column], abs=1e-6, nan_ok=True)
        for uri_mixed, uri_lockstep in zip([mixed["image_uri"], *mixed["stage_image_uris"]],
                                           [lockstep["image_uri"], *lockstep["stage_image_uris"]]):
            assert Image.open(uri_mixed).tobytes() == Image.open(uri_lockstep).tobytes()


def test_a_model_folder_missing_on_the_workers_is_one_line_before_any_actor(ray_cluster, tmp_path):
    """The driver lacks the folder and joins a cluster (whose GPU nodes might have it): one small task
    looks for it on a worker, before anything is written or any model loads."""
    prompts = write_prompts(tmp_path / "p.parquet", 2)
    result = CliRunner().invoke(app, ["run", str(prompts), "--output", str(tmp_path / "out"), "--model",
                                      "/no/such/checkpoint/on/the/workers"])
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: on the Ray worker "), result.output
    assert lines[0].endswith("model folder /no/such/checkpoint/on/the/workers does not exist")
    assert not (tmp_path / "out" / "run.json").exists()


def test_image_generator_in_your_own_ray_data_pipeline(ray_cluster):
    import ray

    items = ray.data.from_items([{"id": f"own-{i}", "prompt": f"a blue sphere {i}", "sample_index": 0}
                                 for i in range(6)])
    images = items.map_batches(ImageGenerator, fn_constructor_kwargs={"model": "tiny", "base_seed": 3},
                               batch_size=3, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    rows = sorted(images.take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [f"own-{i}" for i in range(6)]
    for r in rows:
        assert r["status"] == "ok" and r["seed"] == derive_seed(3, r["id"], 0)
        assert Image.open(io.BytesIO(r["image_png"])).size == (96, 96) and r["image_uri"] is None


@pytest.fixture
def one_torch_thread():
    # What a Ray actor gets (one CPU); also far quicker than oversubscribed threads on a small machine.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_image_generator_called_directly_keeps_bad_rows_apart(tmp_path, one_torch_thread):
    generate = ImageGenerator(model="tiny", output=str(tmp_path))
    batch = pa.table({"id": ["good", "bad"], "prompt": ["a red cube", None], "sample_index": [0, 0],
                      "seed": [11, 12]})
    rows = {r["id"]: r for r in generate.draw_all(batch).to_pylist()}  # refused rows come first, then each part's
    assert rows["good"]["status"] == "ok" and rows["bad"]["status"] == "error"
    assert rows["bad"]["error"] == "prompt is missing (null)"
    assert rows["good"]["seed"] == 11 and Image.open(rows["good"]["image_uri"]).size == (96, 96)
    same = generate.draw_all({"id": ["good"], "prompt": ["a red cube"], "sample_index": [0], "seed": [11]}).to_pylist()
    assert same[0]["image_uri"] == rows["good"]["image_uri"]  # any batch format; deterministic keys
