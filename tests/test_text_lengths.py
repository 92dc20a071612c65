"""Emulated text lengths (TWIG_BATCH_EMULATE_TEXT_LENGTHS): parsing, the per-row draw, every text
writer honouring it token for token, and the staged modes' texts stopping in their ranges."""
import re

import pytest
import torch

from twig_batch.engine import fast_text, text_scheduler
from twig_batch.engine.fast_text import generate_text_fast
from twig_batch.engine.runner import Engine
from twig_batch.model import load_janus
from twig_batch.pipeline import ImageRequest
from twig_batch.pipeline.generator import generate_images
from twig_batch.pipeline.staged import generate_staged
from twig_batch.reference.staged import reference_staged
from twig_batch.engine.inputs import TextPrompt
from twig_batch.reference.texts import generate_text_batch, reference_text
from twig_batch.pipeline.text_lengths import (DEFAULT_RANGES, ENV_VAR, TextLengths, describe, emulated_text_lengths,
                                              parse_text_lengths)
from twig_batch.pipeline.thinking import ModelThinker, ThoughtRequest
from twig_batch.prompts import USER_TURN
from twig_batch.settings import GenerationSettings


# --- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, ranges", [
    ("thought=20-120,reflection=10-60,plan=100-300",
     {"thought": (20, 120), "reflection": (10, 60), "plan": (100, 300)}),
    ("realistic", DEFAULT_RANGES),
    ("realistic, plan=50-150", {**DEFAULT_RANGES, "plan": (50, 150)}),
    (" reflection = 7 ", {"reflection": (7, 7)}),
    ("plan=3-4,", {"plan": (3, 4)}),
])
def test_good_specs_parse(spec, ranges):
    lengths = parse_text_lengths(spec)
    assert lengths.ranges == ranges and lengths.spec == spec.strip()


def test_an_empty_spec_is_no_emulation():
    assert parse_text_lengths("") is None and parse_text_lengths(" , ") is None


@pytest.mark.parametrize("spec, bad_part", [
    ("thot=1-2", "thot"),
    ("thought=20-120,reflection", "reflection"),
    ("thought=5-2", "thought=5-2"),
    ("plan=0-3", "plan=0-3"),
    ("plan=a-b", "plan=a-b"),
    ("plan=-3", "plan=-3"),
    ("plan=3-", "plan=3-"),
    ("thought=1-2,thought=3-4", "'thought' given twice"),
    ("realistic,plan=1-2,plan=3-4", "'plan' given twice"),
    ("plan=1-2,realistic", "'realistic' must come first"),
    ("fast", "fast"),
])
def test_bad_specs_name_the_bad_part(spec, bad_part):
    with pytest.raises(ValueError, match=re.escape(bad_part)) as error:
        parse_text_lengths(spec)
    assert ENV_VAR in str(error.value)


def test_the_environment_variable_switches_it_and_it_is_never_silent(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert emulated_text_lengths() is None
    assert "unset" in describe() and "token limit" in describe()
    monkeypatch.setenv(ENV_VAR, "realistic,plan=50-150")
    lengths = emulated_text_lengths()
    assert lengths.ranges == {**DEFAULT_RANGES, "plan": (50, 150)}
    line = describe()
    assert "\n" not in line and ENV_VAR in line and "plan 50-150" in line and "thought 20-120" in line
    assert lengths.record() == {"spec": "realistic,plan=50-150",
                                "ranges": {"thought": [20, 120], "reflection": [25, 130], "plan": [50, 150]}}
    monkeypatch.setenv(ENV_VAR, "plan=9-1")
    with pytest.raises(ValueError, match="plan=9-1"):
        emulated_text_lengths()


# --- the per-row draw ---------------------------------------------------------------------------

def test_draws_are_uniform_over_the_range_per_seed_and_kind():
    lengths = parse_text_lengths("thought=3-7,plan=10-12")
    draws = [lengths.stop_after("thought", seed) for seed in range(2000)]
    assert set(draws) == {3, 4, 5, 6, 7}
    assert all(abs(draws.count(n) - 400) < 80 for n in range(3, 8))
    assert draws == [lengths.stop_after("thought", seed) for seed in range(2000)]  # a pure function
    assert {lengths.stop_after("plan", seed) for seed in range(200)} == {10, 11, 12}
    assert lengths.stop_after("reflection", 5) is None  # a kind not in the spec runs to its limit
    with pytest.raises(ValueError, match="unknown text kind"):
        lengths.stop_after("poem", 5)
    # The kind enters the draw, not only the range.
    same_range = parse_text_lengths("thought=1-1000,reflection=1-1000")
    assert [same_range.stop_after("thought", s) for s in range(20)] != [same_range.stop_after("reflection", s)
                                                                          for s in range(20)]


def _thought_requests(n, base_seed=100):
    return [ThoughtRequest(f"picture number {i}", band, 3, (), None, base_seed + i) for i in range(n)
            for band in range(3)]


def test_a_row_gets_the_same_length_alone_and_in_a_batch(tiny64):
    thinker = ModelThinker(lengths=TextLengths({"thought": (2, 9)}, "thought=2-9"))
    requests = _thought_requests(4)
    batch = thinker.prompts(tiny64, requests)
    alone = [thinker.prompts(tiny64, [r])[0] for r in requests]
    assert [p.stop_after for p in batch] == [p.stop_after for p in alone]
    assert all(2 <= p.stop_after <= 9 for p in batch) and len({p.stop_after for p in batch}) > 2
    written = generate_text_fast(tiny64, batch, 12)
    assert [len(t) for t in written] == [p.stop_after for p in batch]
    assert written == [generate_text_fast(tiny64, [p], 12)[0] for p in alone]
    # Another image's seed, another draw: lengths follow the image, not its place in the batch.
    others = thinker.prompts(tiny64, _thought_requests(4, base_seed=500))
    assert [p.stop_after for p in others] != [p.stop_after for p in batch]
    assert [p.stop_after for p in ModelThinker().prompts(tiny64, requests)] == [None] * len(requests)


# --- every text writer honours stop_after the same way ------------------------------------------

STOPS = [None, 1, 3, 7, 40, 2, 5, None]  # 40 is past the limit below: capped


def _prompts(bundle, stops=STOPS):
    texts = ["describe the top part", "a cat", "paint a large mountain over a river at night with stars",
             "a red cube", "two birds", "a quiet street in the rain", "tree", "night sky with a moon"]
    return [TextPrompt([bundle.tokens.bos, *bundle.encode(USER_TURN.format(text=t))], seed=i, stop_after=stop)
            for i, (t, stop) in enumerate(zip(texts, stops))]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("max_rows", [None, 3])
def test_fast_engine_matches_both_references_with_stops(tiny64, temperature, max_rows):
    prompts = _prompts(tiny64)
    fast = generate_text_fast(tiny64, prompts, 20, temperature, max_rows=max_rows)
    assert fast == generate_text_batch(tiny64, prompts, 20, temperature)
    assert fast == [reference_text(tiny64, p, 20, temperature) for p in prompts]
    assert [len(t) for t in fast] == [20, 1, 3, 7, 20, 2, 5, 20]  # random weights never write the stop token
    # A stopped text is the start of the text that runs on.
    free = generate_text_fast(tiny64, [TextPrompt(p.ids, seed=p.seed) for p in prompts], 20, temperature)
    assert all(f[:len(t)] == t for f, t in zip(free, fast))


def test_rows_that_reach_their_length_leave_the_cache_like_stopped_rows(tiny64, monkeypatch):
    from twig_batch.engine.static_decoder import StaticKVCache

    kept, steps = [], []
    real_keep, real_decode = StaticKVCache.keep_rows, fast_text._Round._decode
    monkeypatch.setattr(StaticKVCache, "keep_rows", lambda cache, rows: kept.append(rows.tolist())
                        or real_keep(cache, rows))
    monkeypatch.setattr(fast_text._Round, "_decode", lambda self: steps.append(1) or real_decode(self))
    stops = [3, 5, 2, 60, 4, 8, 1, None]
    prompts = _prompts(tiny64, stops)
    written = generate_text_fast(tiny64, prompts, 64)
    assert [len(t) for t in written] == [3, 5, 2, 60, 4, 8, 1, 64]
    assert kept and len(kept[0]) == 2  # six rows done by the first check: dropped, two go on
    assert written == [reference_text(tiny64, p, 64) for p in prompts]

    # With every row short, the call ends at the first check instead of running to the limit.
    kept.clear()
    steps.clear()
    generate_text_fast(tiny64, _prompts(tiny64, [3, 5, 2, 6, 4, 8, 1, 7]), 64)
    assert len(steps) < text_scheduler.CHECK_EVERY and not kept


def test_waiting_prompts_take_the_rows_of_texts_that_reached_their_length(tiny64, monkeypatch):
    placed, rounds = [], []
    real_place, real_init = fast_text.place_rows, fast_text._Round.__init__
    monkeypatch.setattr(fast_text, "place_rows", lambda cache, slots, scratch: placed.append(slots.tolist())
                        or real_place(cache, slots, scratch))
    monkeypatch.setattr(fast_text._Round, "__init__", lambda self, call, plan: rounds.append(plan)
                        or real_init(self, call, plan))
    prompts = _prompts(tiny64, [2, 3, 4, 2, 3, 4, 2, 3])
    written = generate_text_fast(tiny64, prompts, 40, 1.0, max_rows=3)
    assert written == [reference_text(tiny64, p, 40, 1.0) for p in prompts]
    assert [len(t) for t in written] == [2, 3, 4, 2, 3, 4, 2, 3]
    assert len(rounds) == 1 and placed == [[0, 1, 2], [0, 1]]  # the later prompts joined the first round


# --- the staged modes with the variable set -----------------------------------------------------

@pytest.fixture(scope="module")
def small(tiny_hf_dir):
    bundle = load_janus(str(tiny_hf_dir), "cpu", torch.float64)
    bundle.model.config.vq_config.num_patches = 6  # 36 image tokens: 3 bands of 2 token rows
    return bundle


PROMPTS = ["a red cube", "a small cat on a large table next to a lamp", "tree"]
RANGES = {"thought": (2, 5), "reflection": (7, 10), "plan": (12, 30)}  # apart, so a length names its kind
SPEC = ",".join(f"{kind}={low}-{high}" for kind, (low, high) in RANGES.items())
LIMIT = 16  # below plan's top: plans are capped


@pytest.fixture
def text_calls(monkeypatch):
    """Every text call of the staged loop: (prompts, limit, texts as token ids). As with the random
    7B-sized weights of the benchmarks, no text ends on its own: the tiny model's end-of-sequence
    is replaced by an id it cannot draw."""
    calls = []

    def recording(engine, prompts, max_new_tokens, temperature=0.0, **kw):
        never = engine.bundle.model.config.text_config.vocab_size
        written = generate_text_fast(engine.bundle, prompts, max_new_tokens, temperature, stop_id=never, **kw)
        calls.append((prompts, max_new_tokens, written))
        return written

    monkeypatch.setattr(Engine, "write_texts", recording)
    return calls


def _kind_of(length):
    return next((kind for kind, (low, high) in RANGES.items() if low <= length <= min(high, LIMIT)), None)


def _requests():
    return [ImageRequest(f"p{i}", p, 0, 100 + i) for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("mode, kinds", [("twig", {"thought": 9, "reflection": 9}), ("seed", {"plan": 9})])
def test_generate_images_texts_stop_in_their_ranges(small, text_calls, monkeypatch, mode, kinds):
    monkeypatch.setenv(ENV_VAR, SPEC)
    settings = GenerationSettings(mode=mode, bands=3, think_max_tokens=LIMIT, guidance_max_tokens=LIMIT)
    results = generate_images(small, _requests(), settings)
    rows = [(p, limit, ids) for prompts, limit, written in text_calls for p, ids in zip(prompts, written)]
    assert all(len(ids) == min(p.stop_after, limit) for p, limit, ids in rows)
    found = [_kind_of(len(ids)) for _, _, ids in rows]
    assert {kind: found.count(kind) for kind in set(found)} == kinds
    if mode == "twig":
        assert len(text_calls) == 4  # first thoughts; reflections with next thoughts twice; last reflections
        assert all(len(r.thoughts) == 3 and len(r.reflections) == 3 for r in results)
    else:
        assert any(len(ids) == LIMIT for _, _, ids in rows)  # some plans drew past the limit: capped
        assert all(len(r.thoughts) == 3 for r in results)


@pytest.mark.parametrize("mode", ["twig", "seed"])
def test_generate_images_texts_run_to_their_limits_without_it(small, text_calls, monkeypatch, mode):
    monkeypatch.delenv(ENV_VAR, raising=False)
    settings = GenerationSettings(mode=mode, bands=3, think_max_tokens=LIMIT, guidance_max_tokens=LIMIT)
    generate_images(small, _requests(), settings)
    rows = [(p, ids) for prompts, _, written in text_calls for p, ids in zip(prompts, written)]
    assert len(rows) == (18 if mode == "twig" else 9)
    assert all(p.stop_after is None and len(ids) == LIMIT for p, ids in rows)


@pytest.mark.parametrize("mode", ["twig", "seed"])
def test_batch_single_and_reference_agree_with_it(small, monkeypatch, mode):
    monkeypatch.setenv(ENV_VAR, SPEC)
    settings = GenerationSettings(mode=mode, bands=3, think_max_tokens=LIMIT, guidance_max_tokens=LIMIT)
    requests = _requests()[:2]
    batch = generate_staged(small, requests, settings)
    for request, result in zip(requests, batch):
        [single] = generate_staged(small, [request], settings)
        reference = reference_staged(small, request, settings)
        for other in (single, reference):
            assert torch.equal(result.codes, other.codes) and result.thoughts == other.thoughts
            assert result.reflections == other.reflections
    monkeypatch.delenv(ENV_VAR)
    assert [r.thoughts for r in generate_staged(small, requests, settings)] != [r.thoughts for r in batch]
