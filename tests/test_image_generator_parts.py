"""The actor draws a batch in parts sized to the device; the split never changes an image."""
import pyarrow as pa
import pytest

import twig_batch.pipeline
from twig_batch.distributed.image_generator import ImageGenerator, even_parts, part_size
from twig_batch.pipeline.sequences import bytes_per_image
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
    prompts = ["a cat"] * 300
    assert part_size(bundle, settings, prompts, fixed=7, free_bytes=10**12) == 7
    assert part_size(bundle, settings, prompts, fixed=None, free_bytes=None) == 300
    free = 300 * bytes_per_image(bundle, settings)
    fits = part_size(bundle, settings, prompts, fixed=None, free_bytes=free)
    assert 1 < fits < 300  # some of the memory stays free (headroom, the prefill's activations)
    assert part_size(bundle, settings, prompts, fixed=None, free_bytes=2 * free) > fits
    long_prompt = prompts + [" ".join(["cube"] * 400)]
    assert part_size(bundle, settings, long_prompt, fixed=None, free_bytes=free) < fits


def test_a_batch_is_drawn_in_parts_of_about_equal_size():
    assert [even_parts(256, most) for most in (165, 256, 300, 100, 1)] == [128, 256, 256, 86, 1]
    assert even_parts(5, 2) == 2  # 2 + 2 + 1: three parts either way


def test_work_items_carry_their_ids_and_seeds_and_the_actor_draws_with_them(generators):
    from twig_batch.distributed.work_items import as_work_item, expand_to_work_items
    from twig_batch.seeds import derive_seed

    items = expand_to_work_items(pa.table({"prompt": ["a red cube", "a cat"]}), prompt_column="prompt",
                                 id_column=None, samples=2, base_seed=7).to_pylist()
    assert [as_work_item(item, None) for item in items] == items  # final: nothing is derived again
    strict = ImageGenerator(model="tiny-micro", base_seed=None)  # as the batch job builds its actors
    rows = strict.draw_all(pa.Table.from_pylist(items)).to_pylist()
    assert [(r["id"], r["sample_index"], r["seed"]) for r in rows] == \
        [(i["id"], i["sample_index"], i["seed"]) for i in items]
    with pytest.raises(ValueError, match="has no seed, and no base seed was given"):
        strict.draw_all(pa.table({"id": ["x"], "prompt": ["a red cube"]}))
    # A row of another pipeline is completed by the batch job's rules: the same id and seed it would get.
    (row,) = generators[1].draw_all(pa.table({"prompt": ["a red cube"]})).to_pylist()
    assert (row["id"], row["seed"]) == (items[0]["id"], derive_seed(0, items[0]["id"], 0))
