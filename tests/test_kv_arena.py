"""The KV arena: one cache buffer lent call after call, and the graph sets kept over it."""
import gc

import torch

from twig_batch.engine.fast import draw_image_tokens_fast
from twig_batch.engine.graphs import _KEPT, _graph_set
from twig_batch.engine.kv_arena import arena_for, idle_arena_bytes, release_arenas
from twig_batch.reference.image_tokens import reference_image_tokens
from twig_batch.engine.static_decoder import StaticKVCache
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.settings import GenerationSettings


def test_one_holder_at_a_time_and_the_same_addresses_for_the_next(tiny64):
    release_arenas()
    lm = tiny64.language_model
    first = StaticKVCache(lm, rows=4, max_len=40)
    assert first.arena and first.max_len >= 40
    first.valid.fill_(True)
    second = StaticKVCache(lm, rows=4, max_len=40)  # asked while lent: memory of its own
    assert not second.arena and second.k.data_ptr() != first.k.data_ptr()
    arena = arena_for(first.k.device, first.k.dtype)
    assert arena.lent() and idle_arena_bytes(first.k.device) == 0  # lent memory is not free memory
    address, width = first.k.data_ptr(), first.max_len
    del first, second
    gc.collect()
    assert not arena.lent() and idle_arena_bytes(torch.device("cpu")) >= arena.nbytes > 0
    again = StaticKVCache(lm, rows=4, max_len=20)
    assert again.arena
    assert (again.k.data_ptr(), again.max_len) == (address, width)  # one shape per row count
    assert not again.valid.any()  # nothing of the last call is readable


def test_a_bigger_request_replaces_the_buffer_and_forgets_its_graphs(tiny64):
    lm = tiny64.language_model
    cache = StaticKVCache(lm, rows=2, max_len=16)
    kept = _graph_set(tiny64, cache, tiny64.embed_image_codes)
    assert _graph_set(tiny64, cache, tiny64.embed_image_codes) is kept
    del cache
    gc.collect()
    again = StaticKVCache(lm, rows=2, max_len=16)
    assert _graph_set(tiny64, again, tiny64.embed_image_codes) is kept  # reused by the next call
    width = again.max_len
    del again
    gc.collect()
    bigger = StaticKVCache(lm, rows=2, max_len=width + 1)
    assert bigger.max_len > width
    assert _graph_set(tiny64, bigger, tiny64.embed_image_codes) is not kept
    assert all(s is not kept for s in _KEPT.values())  # graphs over the dropped buffer are forgotten
    own = StaticKVCache(lm, rows=3, max_len=8)  # arena lent to `bigger`: memory of its own, graphs too
    assert not own.arena
    assert _graph_set(tiny64, own, tiny64.embed_image_codes) is not _graph_set(tiny64, own, tiny64.embed_image_codes)


def test_stale_contents_of_the_arena_never_change_a_token(tiny64):
    settings = GenerationSettings(top_k=100)
    rows = [t2i_prompt_ids(tiny64, p) for p in ["a red cube", "blue sky over a long river", "cat"]]
    release_arenas()
    fresh = draw_image_tokens_fast(tiny64, rows, [5, 6, 7], settings, 48)
    arena = arena_for(tiny64.device, tiny64.dtype)
    assert arena.buffer is not None
    arena.buffer.fill_(1e4)  # what an earlier call with other prompts could have left, only louder
    reused = draw_image_tokens_fast(tiny64, rows, [5, 6, 7], settings, 48)
    assert torch.equal(fresh, reused)
    for b in range(3):
        assert torch.equal(reused[b], reference_image_tokens(tiny64, rows[b], 5 + b, settings, 48))


def test_a_reserved_arena_serves_every_call_up_to_its_size_without_growing(tiny64):
    from twig_batch.engine.memory import reserve_kv_arena
    from twig_batch.pipeline.sequences import call_shape
    from twig_batch.settings import GenerationSettings

    release_arenas()
    settings = GenerationSettings(mode="twig", think_max_tokens=8)
    reserve_kv_arena(tiny64, call_shape(tiny64, settings), images=4)
    arena = arena_for(tiny64.device, tiny64.dtype)
    reserved, address = arena.nbytes, arena.buffer.data_ptr()
    assert reserved > 0
    for rows, columns in [(8, 40), (4, 200), (2, 300)]:  # image calls (2 rows an image), text calls
        cache = StaticKVCache(tiny64.language_model, rows, columns)
        assert cache.arena and cache.k.data_ptr() == address
        del cache
        gc.collect()
    assert arena.nbytes == reserved


def test_a_call_gives_the_arena_back_even_if_its_cache_is_still_referenced(tiny64, monkeypatch):
    from twig_batch.engine import fast, fast_text
    from twig_batch.engine.inputs import TextPrompt

    kept = []

    class Remembered(StaticKVCache):  # something holding on to every cache after its call
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            kept.append(self)

    monkeypatch.setattr(fast, "StaticKVCache", Remembered)
    monkeypatch.setattr(fast_text, "StaticKVCache", Remembered)
    rows = [t2i_prompt_ids(tiny64, "a red cube")]
    draw_image_tokens_fast(tiny64, rows, [1], GenerationSettings(), 8)
    fast_text.generate_text_fast(tiny64, [TextPrompt(tiny64.encode("a cat"))], 4)
    assert len(kept) == 2 and all(cache.k is None for cache in kept)  # closed: unusable
    assert not arena_for(tiny64.device, tiny64.dtype).lent()


def test_a_reservation_never_takes_more_than_the_headroom_of_free_memory(tiny64, monkeypatch):
    from twig_batch.engine import memory
    from twig_batch.pipeline.sequences import call_shape
    from twig_batch.settings import GenerationSettings

    release_arenas()
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: 1_000_000)  # a nearly full device
    memory.reserve_kv_arena(tiny64, call_shape(tiny64, GenerationSettings(mode="twig")), images=64)
    assert arena_for(tiny64.device, tiny64.dtype).nbytes <= int(1_000_000 * memory.HEADROOM)


def test_dropping_rows_moves_the_kept_ones_within_the_cache_and_keeps_the_arena(tiny64):
    release_arenas()
    lm = tiny64.language_model
    cache = StaticKVCache(lm, rows=4, max_len=12)
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
    arena = arena_for(cache.k.device, cache.k.dtype)
    assert arena.lent() and not cache.arena  # still its memory, but a one-off shape: graphs not kept
    cache.close()
    assert not arena.lent()
