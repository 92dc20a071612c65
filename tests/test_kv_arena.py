"""An engine's KV arena: one cache buffer lent call after call, and the graph sets kept over it."""
import gc

import torch

from twig_batch.engine.runner import Engine
from twig_batch.engine.static_decoder import StaticKVCache
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.reference.image_tokens import reference_image_tokens
from twig_batch.settings import GenerationSettings


def image_graphs(engine, bundle, cache):
    return engine.graphs.graph_set(engine.model, cache, bundle.embed_image_codes, "image")


def test_one_holder_at_a_time_and_the_same_addresses_for_the_next(tiny64):
    engine = Engine(tiny64)
    lm = tiny64.language_model
    first = StaticKVCache(lm, rows=4, max_len=40, arenas=engine.arenas)
    assert first.arena and first.max_len >= 40
    first.valid.fill_(True)
    second = StaticKVCache(lm, rows=4, max_len=40, arenas=engine.arenas)  # asked while lent: memory of its own
    assert not second.arena and second.k.data_ptr() != first.k.data_ptr()
    arena = engine.arenas.for_dtype(tiny64.dtype)
    assert arena.lent() and engine.arenas.idle_bytes() == 0  # lent memory is not free memory
    address, width = first.k.data_ptr(), first.max_len
    del first, second
    gc.collect()
    assert not arena.lent() and engine.arenas.idle_bytes() >= arena.nbytes > 0
    again = StaticKVCache(lm, rows=4, max_len=20, arenas=engine.arenas)
    assert again.arena
    assert (again.k.data_ptr(), again.max_len) == (address, width)  # one shape per row count
    assert not again.valid.any()  # nothing of the last call is readable


def test_a_bigger_request_replaces_the_buffer_and_forgets_its_graphs(tiny64):
    engine = Engine(tiny64)
    lm = tiny64.language_model
    cache = StaticKVCache(lm, rows=2, max_len=16, arenas=engine.arenas)
    kept = image_graphs(engine, tiny64, cache)
    assert image_graphs(engine, tiny64, cache) is kept
    del cache
    gc.collect()
    again = StaticKVCache(lm, rows=2, max_len=16, arenas=engine.arenas)
    assert image_graphs(engine, tiny64, again) is kept  # reused by the next call
    width = again.max_len
    del again
    gc.collect()
    bigger = StaticKVCache(lm, rows=2, max_len=width + 1, arenas=engine.arenas)
    assert bigger.max_len > width
    assert image_graphs(engine, tiny64, bigger) is not kept
    assert kept not in engine.graphs  # graphs over the dropped buffer are forgotten
    # the arena is lent to `bigger`: memory of its own, graphs too
    own = StaticKVCache(lm, rows=3, max_len=8, arenas=engine.arenas)
    assert not own.arena
    assert image_graphs(engine, tiny64, own) is not image_graphs(engine, tiny64, own)


def test_stale_contents_of_the_arena_never_change_a_token(tiny64):
    settings = GenerationSettings(top_k=100)
    rows = [t2i_prompt_ids(tiny64, p) for p in ["a red cube", "blue sky over a long river", "cat"]]
    engine = Engine(tiny64)
    fresh = engine.draw_image_tokens(rows, [5, 6, 7], settings, 48)
    arena = engine.arenas.for_dtype(tiny64.dtype)
    assert arena.buffer is not None
    arena.buffer.fill_(1e4)  # what an earlier call with other prompts could have left, only louder
    reused = engine.draw_image_tokens(rows, [5, 6, 7], settings, 48)
    assert torch.equal(fresh, reused)
    for b in range(3):
        assert torch.equal(reused[b], reference_image_tokens(tiny64, rows[b], 5 + b, settings, 48))


def test_a_reserved_arena_serves_every_call_up_to_its_size_without_growing(tiny64):
    from twig_batch.pipeline.sequences import call_shape
    from twig_batch.settings import GenerationSettings

    engine = Engine(tiny64)
    settings = GenerationSettings(mode="twig", think_max_tokens=8)
    engine.reserve(call_shape(tiny64, settings), images=4)
    arena = engine.arenas.for_dtype(tiny64.dtype)
    reserved, address = arena.nbytes, arena.buffer.data_ptr()
    assert reserved > 0
    for rows, columns in [(8, 40), (4, 200), (2, 300)]:  # image calls (2 rows an image), text calls
        cache = StaticKVCache(tiny64.language_model, rows, columns, arenas=engine.arenas)
        assert cache.arena and cache.k.data_ptr() == address
        del cache
        gc.collect()
    assert arena.nbytes == reserved


def test_a_call_gives_the_arena_back_even_if_its_cache_is_still_referenced(tiny64, monkeypatch):
    from twig_batch.engine import fast, fast_text
    from twig_batch.engine.inputs import TextPrompt

    kept = []
    engine = Engine(tiny64)

    class Remembered(StaticKVCache):  # something holding on to every cache after its call
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            kept.append(self)

    monkeypatch.setattr(fast, "StaticKVCache", Remembered)
    monkeypatch.setattr(fast_text, "StaticKVCache", Remembered)
    rows = [t2i_prompt_ids(tiny64, "a red cube")]
    engine.draw_image_tokens(rows, [1], GenerationSettings(), 8)
    engine.write_texts([TextPrompt(tiny64.encode("a cat"))], 4)
    assert len(kept) == 2 and all(cache.k is None for cache in kept)  # closed: unusable
    assert not engine.arenas.for_dtype(tiny64.dtype).lent()


def test_a_reservation_never_takes_more_than_the_headroom_of_free_memory(tiny64, monkeypatch):
    from twig_batch.engine import memory, runner
    from twig_batch.pipeline.sequences import call_shape
    from twig_batch.settings import GenerationSettings

    engine = Engine(tiny64)
    monkeypatch.setattr(runner, "free_device_bytes", lambda device, arenas=None: 1_000_000)  # nearly full
    engine.reserve(call_shape(tiny64, GenerationSettings(mode="twig")), images=64)
    assert engine.arenas.for_dtype(tiny64.dtype).nbytes <= int(1_000_000 * memory.HEADROOM)


def test_dropping_rows_moves_the_kept_ones_within_the_cache_and_keeps_the_arena(tiny64):
    engine = Engine(tiny64)
    lm = tiny64.language_model
    cache = StaticKVCache(lm, rows=4, max_len=12, arenas=engine.arenas)
    cache.used = 5
    for row in range(4):  # each row's written columns hold its number; the rest must not matter
        cache.k[:, row, :, :5] = row
        cache.v[:, row, :, :5] = -row
        cache.valid[row, :5] = row % 2 == 0
    address = cache.k.data_ptr()
    cache.keep_rows(torch.tensor([3, 0, 2]))
    assert cache.k.shape[1] == 3 and cache.k.data_ptr() == address  # no second copy of the cache
    assert [int(cache.k[0, r, 0, 4, 0]) for r in range(3)] == [3, 0, 2]
    assert [int(cache.v[-1, r, 0, 0, 0]) for r in range(3)] == [-3, 0, -2]
    assert cache.valid[:, :5].tolist() == [[False] * 5, [True] * 5, [True] * 5]
    arena = engine.arenas.for_dtype(tiny64.dtype)
    assert arena.lent() and not cache.arena  # still its memory, but a one-off shape: graphs not kept
    cache.close()
    assert not arena.lent()
