"""A failing part is never quietly redrawn row by row: out of memory halves it, other errors are
bisected to the rows they belong to, and the driver says each once and records it in run.json."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from batch_support import read_manifest
from twig_batch.cli import app
from twig_batch.distributed.parts import PartDrawer

runner = CliRunner()


class FakeModel:
    """Draws `str(request)` per request; raises as told; remembers every call's size."""

    def __init__(self, oom_above=None, bad=(), broken=False, error=RuntimeError):
        self.oom_above, self.bad, self.broken, self.error = oom_above, set(bad), broken, error
        self.calls = []

    def __call__(self, part):
        self.calls.append(list(part))
        if self.oom_above is not None and len(part) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.broken or self.bad & set(part):
            raise self.error("the same message every time")
        return [f"image {r}" for r in part]


def outcomes(drawn):
    return {d.request: (d.result, d.error) for d in drawn}


def test_out_of_memory_halves_the_part_and_caps_later_parts():
    model = FakeModel(oom_above=3)
    parts = PartDrawer(model)
    drawn = parts.run(list(range(10)))
    assert outcomes(drawn) == {r: (f"image {r}", None) for r in range(10)}
    assert [len(c) for c in model.calls] == [10, 5, 3, 2, 5, 3, 2]
    assert parts.cap == 3
    assert [(e.kind, e.part_images, e.into) for e in parts.events] == [
        ("out_of_memory", 10, (5, 5)), ("out_of_memory", 5, (3, 2)), ("out_of_memory", 5, (3, 2))]
    assert "CUDA out of memory" in parts.events[0].message
    assert [len(p) for p in parts.parts(list(range(8)), size=100)] == [3, 3, 2]  # the size that worked


def test_one_image_that_does_not_fit_is_that_rows_error():
    drawn = PartDrawer(FakeModel(oom_above=0)).run([7, 8])
    assert all(d.error.startswith("out of memory even for one image: OutOfMemoryError") for d in drawn)


def test_a_bad_row_is_found_by_bisection_not_row_by_row():
    model = FakeModel(bad={5})
    parts = PartDrawer(model)
    drawn = outcomes(parts.run(list(range(16))))
    assert drawn[5] == (None, "generation failed: RuntimeError: the same message every time")
    assert all(drawn[r] == (f"image {r}", None) for r in range(16) if r != 5)
    assert len(model.calls) <= 1 + 2 * 4  # a part, then two halves per level of a 16-row bisection
    assert max(len(c) for c in model.calls[1:]) == 8  # the good half was drawn whole
    (event,) = parts.events
    assert (event.kind, event.part_images, event.outcome) == ("part_failed", 16, "1 of 16 row(s) failed; "
                                                                                  "the others were drawn")


def test_an_error_of_every_call_fails_the_part_after_four_calls():
    model = FakeModel(broken=True)
    parts = PartDrawer(model)
    drawn = parts.run(list(range(64)))
    assert all(d.error == "generation failed: RuntimeError: the same message every time" for d in drawn)
    assert [len(c) for c in model.calls] == [64, 32, 32, 1]
    assert parts.events[0].outcome == "every row failed: the error is not about particular rows"


def test_two_bad_rows_in_both_halves_are_still_told_apart_when_the_first_row_is_fine():
    model = FakeModel(bad={3, 12})
    drawn = outcomes(PartDrawer(model).run(list(range(16))))
    assert {r for r, (_, error) in drawn.items() if error} == {3, 12}
    assert all(drawn[r][0] == f"image {r}" for r in range(16) if r not in (3, 12))


def test_a_cuda_error_is_raised_for_ray_to_restart_the_actor():
    model = FakeModel(broken=True, error=lambda m: RuntimeError("CUDA error: an illegal memory access was "
                                                                "encountered"))
    with pytest.raises(RuntimeError, match="CUDA error"):
        PartDrawer(model).run(list(range(4)))
    assert len(model.calls) == 1


@pytest.fixture(scope="module")
def cluster(shared_ray):
    return shared_ray


def write_work(path, count, poisoned=None):
    prompts = [f"a small red cube number {i}" for i in range(count)]
    if poisoned is not None:
        prompts[poisoned] = "a poisoned prompt"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(count)], "prompt": prompts}), path)
    return path


def test_a_run_says_each_split_and_failure_once_and_records_it(cluster, tmp_path):
    prompts = write_work(tmp_path / "p.parquet", 12, poisoned=6)
    plan = json.dumps({"oom_above_images": 2, "fail_prompts_containing": "poisoned"})
    result = runner.invoke(app, ["run", str(prompts), "--output", str(tmp_path / "out"), "--model", "tiny-micro",
                                 "--actors", 1, "--images-per-call", 6, "--faults", plan])
    assert result.exit_code == 3, result.output  # finished, with one error row
    lines = result.output.splitlines()
    oom = [line for line in lines if "out of memory drawing a part" in line]
    # The first batch: 6 -> 3 + 3, then each 3 -> 2 + 1 (said once); the second batch comes in parts of 2.
    assert len(oom) == 2 and "of 6 image(s)" in oom[0] and "split into 3 + 3" in oom[0]
    assert "of 3 image(s)" in oom[1] and "later parts hold at most 2" in oom[1]
    failed = [line for line in lines if "failed with RuntimeError: injected failure" in line]
    assert len(failed) == 1 and "1 of 2 row(s) failed; the others were drawn" in failed[0]
    assert sum("ready after" in line for line in lines) == 1
    assert any(line.startswith("progress: ") for line in lines)
    assert "done: 11 image(s) drawn, 1 error(s)" in result.output

    rows = {r["id"]: r for r in read_manifest(tmp_path / "out").to_pylist()}
    assert rows["q6"]["status"] == "error"
    assert rows["q6"]["error"] == ("generation failed: RuntimeError: injected failure for a prompt containing "
                                   "'poisoned'")
    assert all(r["status"] == "ok" for i, r in rows.items() if i != "q6")

    attempt = json.loads((tmp_path / "out" / "run.json").read_text())["attempts"][-1]
    kinds = [e["kind"] for e in attempt["part_events"]]
    assert kinds.count("out_of_memory") == 3 and kinds.count("part_failed") == 1
    assert attempt["part_event_counts"] == {"out_of_memory": 3, "part_failed": 1}
    (actor,) = attempt["actor_stats"].values()
    assert actor["startup_s"] > 0 and actor["images"] == 12 and actor["parts"] == 1 + 3


def test_split_parts_draw_the_same_images_as_whole_ones(cluster, tmp_path):
    prompts = write_work(tmp_path / "p.parquet", 5)
    common = ["--model", "tiny-micro", "--actors", 1, "--images-per-call", 5, "--dtype", "float64"]  # batch invariance is exact in float64
    split = runner.invoke(app, ["run", str(prompts), "--output", str(tmp_path / "split"), *map(str, common),
                                "--faults", json.dumps({"oom_above_images": 1})])
    whole = runner.invoke(app, ["run", str(prompts), "--output", str(tmp_path / "whole"), *map(str, common)])
    assert split.exit_code == 0 and whole.exit_code == 0, split.output + whole.output
    images = sorted(path.relative_to(tmp_path / "whole") for path in (tmp_path / "whole").rglob("*.png"))
    assert len(images) == 5 * 4  # each final image and its three band images
    for name in images:
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_rows_reach_the_driver_part_by_part_not_batch_by_batch(cluster, tmp_path):
    from twig_batch.distributed import RunConfig, run_batch

    prompts = [f"prompt {i}: a red cube on a wooden table" for i in range(32)]
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(32)], "prompt": prompts}), tmp_path / "p.parquet")
    run_batch(RunConfig(input=str(tmp_path / "p.parquet"), output=str(tmp_path / "out"), model="tiny-micro", actors=1,
                        images_per_call=8, work_batch_size=32, faults={"part_delay_s": 1.0}), echo=lambda line: None)
    (actor,) = json.loads((tmp_path / "out" / "run.json").read_text())["attempts"][-1]["actor_stats"].values()
    assert actor["parts"] == 4
    # One batch of 32 in four parts: each part's rows reach the driver as that part ends, a second apart.
    assert actor["last_part_at"] - actor["first_part_at"] >= 3 * 1.0 * 0.8


def test_kernels_that_cannot_be_compiled_are_said_once_and_recorded(cluster, tmp_path):
    prompts = write_work(tmp_path / "p.parquet", 4)
    result = runner.invoke(app, ["run", str(prompts), "--output", str(tmp_path / "out"), "--model", "tiny-micro",
                                 "--actors", 1, "--images-per-call", 2,
                                 "--faults", json.dumps({"kernels_fail_to_compile": True})])
    assert result.exit_code == 0, result.output  # slower, not failed
    said = [line for line in result.output.splitlines() if "uncompiled (slower)" in line]
    assert len(said) == 1, result.output
    assert "gumbel_argmax: RuntimeError: injected: no compiler on this platform" in said[0]

    attempt = json.loads((tmp_path / "out" / "run.json").read_text())["attempts"][-1]
    (actor,) = attempt["actor_stats"].values()
    assert {"name": "gumbel_argmax", "error": "RuntimeError: injected: no compiler on this platform"} \
        in actor["uncompiled_kernels"]
    assert actor["startup_s"] > 0 and actor["images"] == 4
