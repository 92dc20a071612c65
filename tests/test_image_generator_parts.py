"""The actor draws a batch in parts sized to the device; the split never changes an image."""
import math

import pyarrow as pa
import pytest

import twig_batch.pipeline
from twig_batch.distributed.image_generator import ImageGenerator, even_parts, part_size
from twig_batch.engine.memory import bytes_per_image, prefill_slice_bytes
from twig_batch.settings import GenerationSettings


def work(n):
    return pa.table({"id": [f"i{k}" for k in range(n)], "prompt": [f"a red cube number {k}" for k in range(n)],
                     "sample_index": pa.array([0] * n, pa.int32()), "seed": pa.array(range(n), pa.int64())})


@pytest.fixture(scope="module")
def generators():
    return ImageGenerator(model="tiny-micro", images_per_call=2), ImageGenerator(model="tiny-micro")


def test_parts_of_two_give_the_same_images_as_one_call(generators, monkeypatch):
    in_parts, whole = generators
    calls = []
    real = twig_batch.pipeline.generate_images
    monkeypatch.setattr(twig_batch.pipeline, "generate_images", lambda b, reqs, *a, **k: calls.append(len(reqs))
                        or real(b, reqs, *a, **k))
    split = in_parts.draw_all(work(5)).to_pylist()
    assert calls == [2, 2, 1]
    single = whole.draw_all(work(5)).to_pylist()
    assert calls[3:] == [5]  # on a CPU the whole batch is one call
    assert [r["status"] for r in split] == ["ok"] * 5
    assert [r["image_png"] for r in split] == [r["image_png"] for r in single]
    assert [r["id"] for r in split] == [f"i{k}" for k in range(5)]


def test_part_size_follows_free_memory_and_the_longest_prompt(generators):
    bundle = generators[0].bundle
    settings = GenerationSettings()
    one = bytes_per_image(bundle, settings)
    prompts = ["a cat"] * 300
    assert part_size(bundle, settings, prompts, fixed=7, free_bytes=10**12) == 7
    assert part_size(bundle, settings, prompts, fixed=None, free_bytes=None) == 300
    free = math.ceil((100 * one + prefill_slice_bytes(bundle.language_model)) / 0.8) + 1  # headroom 0.8
    assert part_size(bundle, settings, prompts, fixed=None, free_bytes=free) == 100
    long_prompt = prompts + [" ".join(["cube"] * 400)]
    assert part_size(bundle, settings, long_prompt, fixed=None, free_bytes=free) < 100


def test_a_batch_is_drawn_in_parts_of_about_equal_size():
    assert [even_parts(256, most) for most in (165, 256, 300, 100, 1)] == [128, 256, 256, 86, 1]
    assert even_parts(5, 2) == 2  # 2 + 2 + 1: three parts either way
