"""The actor in the mixed loop: a batch is one part whose rows come back as images finish, and a part
that fails midway draws again only the images not handed back."""
import pyarrow as pa
import pytest

import twig_batch.distributed.image_generator as image_generator
import twig_batch.pipeline
from twig_batch.distributed.actor_report import detach_events
from twig_batch.distributed.image_generator import ImageGenerator

SETTINGS = {"mode": "twig", "think_max_tokens": 4, "bands": 2}


def work(n):
    return pa.table({"id": [f"i{k}" for k in range(n)], "prompt": [f"a red cube number {k}" for k in range(n)],
                     "sample_index": pa.array([0] * n, pa.int32()), "seed": pa.array(range(n), pa.int64())})


@pytest.fixture(scope="module")
def lockstep_rows():
    generator = ImageGenerator(model="tiny-micro", settings=SETTINGS | {"loop": "lockstep"})
    return {row["id"]: row for row in generator.draw_all(work(5)).to_pylist()}


def drawn_images(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Every image the model finishes, by prompt; with `fail_after`, the first call fails once that many
    images of it are done (as a generation error midway through a part would)."""
    finished = []
    real = twig_batch.pipeline.generate_images

    def counting(bundle, requests, settings, *args, on_result=None, **kwargs):
        def heard(index, result):
            finished.append(requests[index].prompt)
            on_result(index, result)
            if fail_after is not None and len(finished) == fail_after:
                raise RuntimeError("injected: a generation error midway through the part")
        return real(bundle, requests, settings, *args, on_result=heard, **kwargs)

    monkeypatch.setattr(twig_batch.pipeline, "generate_images", counting)
    return finished


def test_rows_come_back_as_the_mixed_loop_finishes_images(monkeypatch, lockstep_rows):
    monkeypatch.setattr(image_generator, "STREAM_ROWS", 1)
    finished = drawn_images(monkeypatch)
    generator = ImageGenerator(model="tiny-micro", settings=SETTINGS | {"loop": "mixed"}, report_events=True)
    tables = list(generator(work(5)))
    rows = [row for table in tables for row in detach_events(table)[0].to_pylist()]
    events = [event for table in tables for event in detach_events(table)[1]]
    first_rows, first_events = detach_events(tables[0])  # the start, said before the first rows
    assert first_rows.num_rows == 0 and {e["kind"] for e in first_events} >= {"startup", "part_size"}
    assert len(tables) == 6 and sorted(r["id"] for r in rows) == sorted(lockstep_rows)
    assert [e["images"] for e in events if e["kind"] == "part"] == [1] * 5
    assert [e["loop"] for e in events if e["kind"] == "part_size"] == ["mixed"]
    assert len(finished) == 5
    for row in rows:
        assert row["status"] == "ok" and row["image_png"] == lockstep_rows[row["id"]]["image_png"]
        assert row["thoughts"] == lockstep_rows[row["id"]]["thoughts"]


def test_a_part_that_fails_midway_draws_again_only_the_images_not_handed_back(monkeypatch, lockstep_rows):
    finished = drawn_images(monkeypatch, fail_after=2)
    generator = ImageGenerator(model="tiny-micro", settings=SETTINGS | {"loop": "mixed"}, report_events=True)
    tables = list(generator(work(5)))
    rows = [row for table in tables for row in detach_events(table)[0].to_pylist()]
    events = [event for table in tables for event in detach_events(table)[1]]
    assert sorted(r["id"] for r in rows) == sorted(lockstep_rows)  # every row once
    assert len(finished) == len(set(finished)) == 5  # no image drawn twice
    assert all(r["status"] == "ok" and r["image_png"] == lockstep_rows[r["id"]]["image_png"] for r in rows)
    assert [e["kind"] for e in events if e["kind"] == "part_failed"] == ["part_failed"]


def test_an_out_of_memory_part_in_the_mixed_loop_is_split_and_every_image_drawn_once(monkeypatch, lockstep_rows):
    finished = drawn_images(monkeypatch)
    generator = ImageGenerator(model="tiny-micro", settings=SETTINGS | {"loop": "mixed"},
                               faults={"oom_above_images": 2}, report_events=True)
    tables = list(generator(work(5)))
    rows = [row for table in tables for row in detach_events(table)[0].to_pylist()]
    events = [event for table in tables for event in detach_events(table)[1]]
    assert sorted(r["id"] for r in rows) == sorted(lockstep_rows) and {r["status"] for r in rows} == {"ok"}
    assert sorted(finished) == sorted(r["prompt"] for r in rows)
    assert [e["into"] for e in events if e["kind"] == "out_of_memory"][0] == [3, 2]
    # The next batch is drawn in parts of the size that worked, every one of them.
    again = [row for table in generator(work(5)) for row in detach_events(table)[0].to_pylist()]
    assert sorted(r["id"] for r in again) == sorted(lockstep_rows) and {r["status"] for r in again} == {"ok"}
