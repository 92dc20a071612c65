"""Continuous batching in the static-cache text engine: prompts waiting for a row take the rows of
finished ones mid-call, and every prompt still writes exactly what the one-row reference writes
(tiny model, float64)."""
import pytest
import torch

from twig_batch.engine import fast_text, text_scheduler
from twig_batch.engine.fast_text import generate_text_fast
from twig_batch.engine.fused import FastModel
from twig_batch.engine.memory import kv_bytes_per_token, text_rows_that_fit
from twig_batch.engine.static_decoder import StaticKVCache, forward_static
from twig_batch.engine.text_slots import place_rows
from twig_batch.engine.inputs import TextPrompt
from twig_batch.reference.texts import reference_text
from twig_batch.prompts import USER_TURN

BUDGET = 40
TEXTS = ["a cat", "describe the top part", "tree", "paint a large mountain over a river at night with stars",
         "what is in the sky?", "a small red boat", "two dogs playing in the snow near a wooden fence",
         "sunset", "a lamp on a table", "draw the bottom part of a quiet harbour with fishing boats at dawn",
         "a blue bird", "the moon over the city"]


def _prompts(bundle):
    return [TextPrompt([bundle.tokens.bos, *bundle.encode(USER_TURN.format(text=t))], seed=100 + i)
            for i, t in enumerate(TEXTS)]


def _ragged_stop(free: list[list[int]]) -> int:
    """A token that ends rows at many different steps while leaving some rows their whole budget."""
    def spread(token):
        ends = {row.index(token) for row in free if token in row}
        return len(ends) if sum(token not in row for row in free) >= 2 else 0

    return max(sorted({t for row in free for t in row}), key=spread)


# The random model's next-token distribution is nearly flat: at a low temperature the noise still
# picks almost every token, but tokens repeat enough for one stop token to end many rows.
@pytest.fixture(scope="module", params=[0.0, 0.05], ids=["greedy", "sampled"])
def ragged(request, tiny64):
    """(temperature, stop id, each prompt's reference text) with rows ending at different steps."""
    temperature = request.param
    prompts = _prompts(tiny64)
    stop = _ragged_stop(generate_text_fast(tiny64, prompts, BUDGET, temperature))
    alone = [reference_text(tiny64, p, BUDGET, temperature, stop_id=stop) for p in prompts]
    lengths = sorted(map(len, alone))
    assert lengths[0] < text_scheduler.CHECK_EVERY and lengths[-1] == BUDGET and len(set(lengths)) >= 4
    return temperature, stop, alone


class _Watch:
    """Records every cache the engine makes (rows, columns) and every row handed to a waiting prompt."""

    def __init__(self, monkeypatch, widest_prompt: int):
        self.caches: list[tuple[int, int]] = []
        self.joined = 0
        self.widest_prompt = widest_prompt
        watch = self

        class RecordedCache(StaticKVCache):
            def __init__(self, lm, rows, max_len, **kwargs):
                super().__init__(lm, rows, max_len, **kwargs)
                watch.caches.append((rows, max_len))

        def recorded_place_rows(cache, slots, source):
            watch.joined += len(slots)
            place_rows(cache, slots, source)

        monkeypatch.setattr(fast_text, "StaticKVCache", RecordedCache)
        monkeypatch.setattr(fast_text, "place_rows", recorded_place_rows)

    @property
    def rounds(self) -> int:
        # A round's cache has room for tokens after the prompts; a joiners' prefill cache has none.
        return sum(columns > self.widest_prompt for _, columns in self.caches)


@pytest.mark.parametrize("max_rows", [2, 3, 4, 5])
def test_waiting_prompts_take_finished_rows_and_write_what_they_would_alone(tiny64, ragged, max_rows, monkeypatch):
    temperature, stop, alone = ragged
    prompts = _prompts(tiny64)
    watch = _Watch(monkeypatch, max(len(p.ids) for p in prompts))
    assert generate_text_fast(tiny64, prompts, BUDGET, temperature, stop_id=stop, max_rows=max_rows) == alone
    assert max(rows for rows, _ in watch.caches) <= max_rows
    assert watch.joined > 0


def test_joiners_at_many_steps_keep_their_own_token_index(tiny64, ragged, monkeypatch):
    # Frequent checks let prompts join at many different steps of the call, each its own cohort.
    temperature, stop, alone = ragged
    monkeypatch.setattr(text_scheduler, "CHECK_EVERY", 4)
    prompts = _prompts(tiny64)
    watch = _Watch(monkeypatch, max(len(p.ids) for p in prompts))
    assert generate_text_fast(tiny64, prompts, BUDGET, temperature, stop_id=stop, max_rows=3) == alone
    assert watch.joined >= 6


def test_joiners_move_in_a_few_at_a_time_when_their_prefill_would_be_large(tiny64, ragged, monkeypatch):
    # Joiners are prefilled in a cache of their own: bounded by the prefill slice, not by the freed rows.
    temperature, stop, alone = ragged
    prompts = _prompts(tiny64)
    monkeypatch.setattr(fast_text, "PREFILL_CHUNK_TOKENS", 1)  # one joiner per prefill
    watch = _Watch(monkeypatch, max(len(p.ids) for p in prompts))
    assert generate_text_fast(tiny64, prompts, BUDGET, temperature, stop_id=stop, max_rows=5) == alone
    joiner_caches = [rows for rows, columns in watch.caches if columns <= watch.widest_prompt]
    assert joiner_caches and max(joiner_caches) == 1 and watch.joined == len(joiner_caches)


@pytest.mark.parametrize("temperature", [0.0, 0.05], ids=["greedy", "sampled"])
@pytest.mark.parametrize("budget, rounds", [(12, 2), (1, 1)])
def test_a_new_round_starts_when_a_joiners_budget_no_longer_fits(tiny64, monkeypatch, budget, rounds, temperature):
    # Random weights never write the stop token: every row runs its whole budget, so rows free up
    # together at the budget's end and joiners soon run out of cache columns.
    prompts = _prompts(tiny64)
    watch = _Watch(monkeypatch, max(len(p.ids) for p in prompts))
    fast = generate_text_fast(tiny64, prompts, budget, temperature, max_rows=3)
    assert fast == [reference_text(tiny64, p, budget, temperature) for p in prompts]
    assert all(len(t) == budget for t in fast)
    assert watch.rounds == rounds and watch.joined > 0
    assert max(rows for rows, _ in watch.caches) <= 3


def test_enough_rows_for_every_prompt_is_one_call_as_before(tiny64, ragged, monkeypatch):
    temperature, stop, alone = ragged
    prompts = _prompts(tiny64)
    watch = _Watch(monkeypatch, max(len(p.ids) for p in prompts))
    for max_rows in (None, len(prompts), len(prompts) + 5):
        assert generate_text_fast(tiny64, prompts, BUDGET, temperature, stop_id=stop, max_rows=max_rows) == alone
    assert watch.joined == 0
    assert watch.caches == [(len(prompts), max(len(p.ids) for p in prompts) + BUDGET)] * 3


def test_placing_rows_writes_in_place_and_invalidates_the_rest_of_the_row(tiny64):
    lm = tiny64.language_model
    cache = StaticKVCache(lm, 3, 16)  # may be wider, lent by the KV arena
    cache.valid.fill_(True)
    cache.used = 10
    source = StaticKVCache(lm, 1, 4)
    embeds = torch.randn(1, 4, lm.config.hidden_size, dtype=torch.float64)
    forward_static(FastModel.plain(lm), source, embeds, torch.arange(4).view(1, 4),
                   torch.tensor([[False, True, True, True]]))
    k, v, valid = cache.k, cache.v, cache.valid
    untouched = cache.k[:, [0, 2]].clone()

    place_rows(cache, torch.tensor([1]), source)

    assert cache.k is k and cache.v is v and cache.valid is valid  # captured graphs still read these
    assert torch.equal(cache.k[:, 1, :, 6:10], source.k[:, 0]) and torch.equal(cache.v[:, 1, :, 6:10], source.v[:, 0])
    assert cache.valid[1].tolist() == [False] * 7 + [True] * 3 + [False] * (cache.max_len - 10)
    assert cache.valid[[0, 2]].all() and torch.equal(cache.k[:, [0, 2]], untouched)


def test_text_rows_that_fit_counts_each_rows_cache_and_one_prefill_slice(tiny64):
    from twig_batch.engine.memory import prefill_bytes_per_token
    from twig_batch.engine.static_decoder import PREFILL_CHUNK_TOKENS

    lm = tiny64.language_model

    def allocated(rows):  # a cache of its own: exactly as wide as asked
        cache = StaticKVCache(lm, rows, 100)
        return cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()

    budget = allocated(10) + allocated(1) // 2
    per_row = text_rows_that_fit(lm, budget, 100, 0)
    assert allocated(per_row) <= budget < allocated(per_row + 1)  # the rows it allows fit, one more would not
    assert text_rows_that_fit(lm, budget, 100, 50) < per_row  # each row's prefill output counts too
    assert text_rows_that_fit(lm, 0, 100, 50) == 1
    # Prefills run a slice of rows at a time: their activations do not grow with the rows, only the
    # hidden states they hand back do (twig's 700-token picture prompts at 7B once ran in two rounds).
    row = 800 * kv_bytes_per_token(lm) + 700 * lm.config.hidden_size * lm.embed_tokens.weight.element_size()
    one_slice = PREFILL_CHUNK_TOKENS * prefill_bytes_per_token(lm)
    assert text_rows_that_fit(lm, 256 * row + one_slice, 800, 700) == 256


def test_a_text_call_whose_cache_fits_in_the_idle_kv_arena_runs_at_once(tiny64, monkeypatch):
    from types import SimpleNamespace

    from twig_batch.engine.memory import prefill_bytes_per_token
    from twig_batch.engine.static_decoder import PREFILL_CHUNK_TOKENS

    lm = tiny64.language_model
    prompts = [TextPrompt(tiny64.encode(f"a picture of {n} red cubes")) for n in range(40)]
    width, budget = max(len(p.ids) for p in prompts), 16
    output = lm.config.hidden_size * lm.embed_tokens.weight.element_size()
    row = (width + budget) * kv_bytes_per_token(lm) + width * output
    arena = 40 * row + PREFILL_CHUNK_TOKENS * prefill_bytes_per_token(lm)  # set aside by the worker already

    def device_holding(own: int, other: int):  # idle arenas: the text cache's dtype, and another one
        monkeypatch.setattr(fast_text, "free_device_bytes", lambda device, arenas: own + other)  # nothing else free
        return SimpleNamespace(for_dtype=lambda dtype: SimpleNamespace(lent=lambda: False, nbytes=own),
                               idle_bytes=lambda: own + other)

    arenas = device_holding(own=arena, other=0)
    assert fast_text._rows_that_fit(tiny64, prompts, budget, arenas) == 40
    arenas = device_holding(own=0, other=10 * arena)  # an fp8 cache's arena stays allocated: no room for a text cache
    assert fast_text._rows_that_fit(tiny64, prompts, budget, arenas) == 1
    # Memory outside the arenas keeps its headroom: the same bytes, all of them free, fit fewer rows.
    arenas = device_holding(own=0, other=0)
    monkeypatch.setattr(fast_text, "free_device_bytes", lambda device, arenas: arena)
    assert fast_text._rows_that_fit(tiny64, prompts, budget, arenas) < 40
