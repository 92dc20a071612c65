"""The mixed loop against the reference loops, token for token (tiny model, float64, CPU): texts and
bands of image tokens from many images in the same steps, prefills cut into chunks, KV pages taken and
given back as rows grow and end, images joining as others free their pages."""
import copy
import dataclasses

import pytest
import torch

from twig_batch.controller import ControllerConfig, LatentController
from twig_batch.engine.inputs import TextPrompt
from twig_batch.engine.mixed.loop import HOST_WAIT, MixedLoop
from twig_batch.engine.mixed.pages import PagePool
from twig_batch.engine.mixed.stages import HostCall, ImageStage, TextStage
from twig_batch.engine.mixed.sizing import mixed_loop
from twig_batch.engine.runner import Engine
from twig_batch.model import load_janus
from twig_batch.pipeline import ImageRequest, generate_images
from twig_batch.pipeline.mixed import generate_mixed
from twig_batch.pipeline.programs import HostWork
from twig_batch.pipeline.reflection import ModelScorer
from twig_batch.pipeline.thinking import ModelThinker
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.reference.image_tokens import reference_image_tokens, reference_plain
from twig_batch.reference.staged import reference_staged
from twig_batch.reference.texts import ReferenceText, reference_text
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "a small cat on a large table next to a lamp", "tree", "night sky with a moon", "a house"]


@pytest.fixture(scope="module")
def small(tiny_hf_dir):
    bundle = load_janus(str(tiny_hf_dir), "cpu", torch.float64)
    bundle.model.config.vq_config.num_patches = 6  # 36 image tokens: 3 bands of 2 token rows
    return bundle


def ask_once(stage):
    """A program asking for one stage and returning its result."""
    result = yield [stage]
    return result[0]


class TracedLoop(MixedLoop):
    """Records, per step, how many runs were active and how many pages were free."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trace = []

    def _step(self, runs):
        self.trace.append((len(runs), self.pool.available))
        return super()._step(runs)


def test_texts_of_many_lengths_match_the_reference_while_sharing_steps(tiny64):
    encode = tiny64.encode
    prompts = [TextPrompt(encode(p * (i + 1)), seed=7 * i, stop_after=[None, 3, None, 1, 6][i])
               for i, p in enumerate(PROMPTS)]
    pool = PagePool(tiny64.language_model, pages=24, page_size=4)
    for temperature in (0.0, 1.0):
        loop = TracedLoop(tiny64, pool, step_tokens=16)
        written = loop.run(ask_once(TextStage(p, 9, temperature)) for p in prompts)
        assert written == [reference_text(tiny64, p, 9, temperature) for p in prompts]
        # Prompts longer than the step's budget were prefilled in chunks, beside rows that were decoding.
        assert max(len(p.ids) for p in prompts) > 16
        assert max(active for active, _ in loop.trace) >= 3
        assert pool.available == pool.pages  # every page given back


def test_questions_about_one_picture_share_the_pages_of_its_prefill(tiny64):
    """Two texts asked together whose prompts begin with the same picture (a reflection and the next
    thought): the second holds the first's full pages of that beginning and prefills only the rest,
    each text as the reference writes it alone; every page is free again at the end."""
    from twig_batch.engine.shared_prefix import picture_prefix
    from twig_batch.pipeline.understanding import featured_prompts
    from twig_batch.prompts import DEFAULT_TEMPLATES

    width = tiny64.language_model.config.hidden_size
    picture = torch.randn(tiny64.understanding_tokens, width, generator=torch.Generator().manual_seed(5),
                          dtype=torch.float64)
    prompts = featured_prompts(tiny64, ["how good is it?", "what comes next, below it?"], [picture, picture],
                               DEFAULT_TEMPLATES)
    page_size = 4
    shared = picture_prefix(tiny64, prompts[0]) // page_size * page_size
    assert shared > 0 and picture_prefix(tiny64, prompts[1]) == picture_prefix(tiny64, prompts[0])

    def ask_both():
        return (yield [TextStage(p, 6) for p in prompts])

    pool = PagePool(tiny64.language_model, pages=400, page_size=page_size)
    loop = MixedLoop(tiny64, pool, step_tokens=256)
    [written] = loop.run([ask_both()])
    assert written == [reference_text(tiny64, p, 6) for p in prompts]
    prefilled = sum(len(p.ids) for p in prompts) - shared
    assert loop.fed_tokens == prefilled + sum(len(w) for w in written) - len(written)  # each last token unfed
    assert pool.available == pool.pages


def test_bands_of_image_tokens_match_the_reference_with_images_joining_as_pages_free(small):
    settings = GenerationSettings(mode="plain")
    codes = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(3))
    stages = [ImageStage(t2i_prompt_ids(small, p), 100 + i, settings, n_tokens=12 + i,
                         prefix_codes=codes[:2 * i] if i else None, first_step=2 * i)
              for i, p in enumerate(PROMPTS)]
    # Room for about two images at once: the others wait for pages and join mid-run.
    pool = PagePool(small.language_model, pages=48, page_size=4)
    loop = TracedLoop(small, pool, step_tokens=32)
    drawn = loop.run(ask_once(s) for s in stages)
    for stage, got in zip(stages, drawn):
        want = reference_image_tokens(small, stage.cond_ids, stage.seed, settings, stage.n_tokens,
                                      stage.prefix_codes, stage.first_step)
        assert torch.equal(got, want)
    assert max(active for active, _ in loop.trace) < len(stages)  # not all at once ...
    assert loop.steps < sum(s.n_tokens for s in stages)  # ... but side by side
    assert pool.available == pool.pages


def test_texts_and_image_tokens_share_steps(small):
    settings = GenerationSettings(mode="plain")
    text = TextPrompt(small.encode(PROMPTS[1]), seed=5)
    stages = [ImageStage(t2i_prompt_ids(small, PROMPTS[0]), 1, settings, n_tokens=20), TextStage(text, 12, 1.0)]
    loop = MixedLoop(small, PagePool(small.language_model, pages=64, page_size=4), step_tokens=64)
    codes, written = loop.run(ask_once(s) for s in stages)
    assert torch.equal(codes, reference_image_tokens(small, stages[0].cond_ids, 1, settings, 20))
    assert written == reference_text(small, text, 12, 1.0)
    assert loop.steps <= 22  # one prefill step (both prompts), then the decodes side by side


def requests_for(prompts, base_seed=100):
    return [ImageRequest(f"p{i}", p, 0, base_seed + i) for i, p in enumerate(prompts)]


def same(a, b):
    return (torch.equal(a.codes, b.codes) and a.thoughts == b.thoughts and a.reflections == b.reflections
            and a.redrawn_bands == b.redrawn_bands and a.image.tobytes() == b.image.tobytes()
            and [(label, im.tobytes()) for label, im in a.band_images]
            == [(label, im.tobytes()) for label, im in b.band_images])


class RejectFirstBand:
    """A stand-in scorer: band 1 of every image is rejected once, with a new description."""

    def reflect(self, bundle, requests, settings):
        return ["Score: 10\nBetter: a plain grey field" if r.band == 0 else "Score: 95\nBetter: fine"
                for r in requests]


@pytest.mark.parametrize("mode,scorer,fixed", [("plain", None, False), ("plain", None, True), ("seed", None, False),
                                               ("twig", None, False), ("twig", RejectFirstBand(), True)])
def test_every_mode_matches_the_reference_image_for_image(small, mode, scorer, fixed):
    """`fixed`: one-token steps at fixed shapes, padded with rows that write the scratch page."""
    settings = GenerationSettings(mode=mode, bands=3, think_max_tokens=5, guidance_max_tokens=5)
    requests = requests_for(PROMPTS[:4])
    # Few pages: images start as others end, each at its own stage (twig's prompts show a canvas).
    pages = 900 if mode == "twig" else 40
    loop = mixed_loop(small, None, pages, 4, 48, fixed_steps=fixed)
    got = generate_mixed(small, requests, settings, scorer=scorer, loop=loop)
    assert bool(loop.decode_steps and loop.decode_steps.steps) == fixed
    for request, result in zip(requests, got):
        assert same(result, reference_staged(small, request, settings, scorer=scorer))
    if scorer is not None:
        assert all(r.redrawn_bands == [0] for r in got)


def test_a_fixed_step_with_fewer_rows_leaves_the_slots_of_its_earlier_rows_alone(tiny64):
    """A one-token step after one with more rows (same shape): the rows it no longer has only pad, and a
    page the earlier rows' sequence gave back keeps what its new owner wrote there."""
    from twig_batch.engine.fused import FastModel
    from twig_batch.engine.mixed.graphs import DecodeSteps
    from twig_batch.engine.mixed.pages import PagedSequence
    from twig_batch.engine.mixed.step import Chunk, mixed_step

    model = FastModel.plain(tiny64.language_model)
    pool = PagePool(tiny64.language_model, pages=8, page_size=4)
    steps = DecodeSteps(model, pool, capture=False)
    g = torch.Generator().manual_seed(0)
    width = tiny64.language_model.config.hidden_size

    def token():
        return torch.randn(1, width, generator=g, dtype=torch.float64)

    def one_each(sequences):
        return [Chunk(s, token(), 0, 1) for s in sequences]

    a, b, c = (PagedSequence(pool, pool.reserve(2)) for _ in range(3))
    steps(one_each([a, b, c]))
    given_back = list(c.table)
    c.free()
    d = PagedSequence(pool, pool.reserve(2))
    mixed_step(model, pool, [Chunk(d, torch.cat([token(), token()]), 0, 2)])
    assert d.table == given_back
    written = pool.k[:, d.slots()].clone()
    steps(one_each([a, b]))
    assert len(steps.steps) == 1  # both steps ran at the same fixed shape
    assert torch.equal(pool.k[:, d.slots()], written)


def test_a_stage_larger_than_the_pool_is_named(small):
    stage = ImageStage(t2i_prompt_ids(small, PROMPTS[1]), 1, GenerationSettings(), n_tokens=36)
    loop = MixedLoop(small, PagePool(small.language_model, pages=4, page_size=4))
    with pytest.raises(RuntimeError, match="36 image tokens needs .* pages of 4"):
        loop.run([ask_once(stage)])


class RecordingText(ReferenceText):
    """The reference's text writer, keeping every prompt it was asked."""

    def __init__(self):
        self.asked = []

    def __call__(self, bundle, prompts, max_new_tokens, temperature=0.0):
        self.asked += prompts
        return super().__call__(bundle, prompts, max_new_tokens, temperature)


def test_twig_asks_the_reference_questions_thinking_ahead_beside_each_reflection(small, monkeypatch):
    """The thought for band k + 1, written beside the reflection on band k, is asked with the prompt
    the reference asks after the reflection (same earlier thoughts, same canvas)."""
    settings = GenerationSettings(mode="twig", bands=3, think_max_tokens=5)
    request = requests_for(PROMPTS[1:2])[0]
    text = RecordingText()
    reference_staged(small, request, settings, thinker=ModelThinker(text=text), scorer=ModelScorer(text=text))
    asked = []
    run_for = MixedLoop._run_for

    def recording_run_for(loop, stage, *rest):
        asked.append(stage)
        return run_for(loop, stage, *rest)

    monkeypatch.setattr(MixedLoop, "_run_for", recording_run_for)
    generate_mixed(small, [request], settings, loop=mixed_loop(small, pages=900, page_size=4))

    def key(prompt):
        return prompt.ids, prompt.seed, None if prompt.image_features is None else prompt.image_features.tolist()

    texts = [s.prompt for s in asked if isinstance(s, TextStage)]
    assert sorted(map(key, texts)) == sorted(map(key, text.asked))
    assert len(texts) == 2 * settings.bands  # a thought per band, a reflection per band


def assert_same_log(a, b):
    """Same evaluations and verdicts; the measured values as close as two summation orders allow."""
    verdicts = ("band", "attempt", "step", "fired", "forced", "injected")
    assert [[r[k] for k in verdicts] for r in a] == [[r[k] for k in verdicts] for r in b]
    for key in ("s_t", "delta_s", "var_s", "u_t"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-9, abs=1e-12, nan_ok=True)


# The tiny model is always unsure, so the controller fires at every evaluation the guard rails allow.
# A window of 4 states: most evaluations see a full window, so images at different steps are
# evaluated in one batch.
CONTROLLER = ControllerConfig(min_history=2, min_gap=4, window=4)


@pytest.mark.parametrize("mode,scorer,fixed", [("plain", None, False), ("seed", None, False), ("seed", None, True),
                                               ("twig", RejectFirstBand(), False)])
def test_with_the_controller_every_image_matches_the_reference_and_its_trigger_log(small, mode, scorer, fixed):
    """An injection's verdict is read a step late: the injected rows' step is taken back, and the run
    waits for others to be redone with it behind the control tokens (`fixed`: that step ran at fixed
    shapes, its output a buffer of its own, and so did the redo, its rows padded to a bucket)."""
    settings = GenerationSettings(mode=mode, bands=3, think_max_tokens=5, guidance_max_tokens=5, controller=CONTROLLER)
    requests = requests_for(PROMPTS if mode != "twig" else PROMPTS[:3])
    controller = LatentController(small, [r.prompt for r in requests], CONTROLLER)
    # Room for two or three images at once: each joins as another ends, so the controller evaluates
    # images at different steps and window lengths in one batch.
    pages = 900 if mode == "twig" else 70
    loop = mixed_loop(small, None, pages, 4, 48, fixed_steps=fixed)
    got = generate_mixed(small, requests, settings, controller, scorer=scorer, loop=loop)
    assert bool(loop.decode_steps and loop.decode_steps.steps) == fixed
    if fixed:  # one-token steps, and redos of the control tokens and one token
        assert {tokens for tokens, _, _ in loop.decode_steps.steps} == {1, CONTROLLER.control_tokens + 1}
    # Injected runs wait for each other: their thinks and redos take fewer passes than injections.
    assert 0 < loop.redo_passes < sum(r.record()["n_injections"] for r in got)
    for request, result in zip(requests, got):
        alone = LatentController(small, [request.prompt], CONTROLLER)
        if mode == "plain":  # one pass over the whole image, as Janus-Pro draws it: the controller sees one band
            codes = reference_plain(small, request.prompt.strip(), request.seed, settings, alone)
            assert torch.equal(result.codes, codes)
            assert_same_log(result.trigger_log, alone.trigger_log(0))
        else:
            reference = reference_staged(small, request, settings, alone, scorer=scorer)
            assert same(result, reference)
            assert_same_log(result.trigger_log, reference.trigger_log)
        assert result.record()["n_injections"] >= 3


def test_images_that_reach_a_decode_together_are_decoded_and_seen_in_one_call(small, monkeypatch):
    """Room for every image at once: they finish each band in the same step, so each band's decodes
    (and twig's canvases for the vision model) are one call for all of them; nothing changes."""
    settings = GenerationSettings(mode="twig", bands=3, think_max_tokens=5)
    requests = requests_for(PROMPTS[:4])
    batches = {"decode": [], "features": []}
    for name in batches:
        original = getattr(HostWork, name)

        def spy(work, items, original=original, name=name):
            batches[name].append(len(items))
            return original(work, items)

        monkeypatch.setattr(HostWork, name, spy)
    got = generate_mixed(small, requests, settings, loop=mixed_loop(small, pages=4000, page_size=4))
    assert max(batches["decode"]) == len(requests) and max(batches["features"]) == len(requests)
    for request, result in zip(requests, got):
        assert same(result, reference_staged(small, request, settings))


@pytest.mark.parametrize("loop", ["mixed", "lockstep"])
def test_twig_decodes_the_last_band_once_its_image_being_the_canvas_the_model_sees(small, loop):
    """A band image is decoded from the rows drawn so far, a canvas from the whole grid with the rows
    not drawn yet as code 0; after the last band the two are the same codes, so they are decoded once:
    per image 3 band images and 2 canvases go through the VQ decoder, not 6, in either loop, and the
    images, thoughts and reflections are still the reference's."""
    settings = GenerationSettings(mode="twig", bands=3, think_max_tokens=5)
    requests = requests_for(PROMPTS[:3])
    decoded = []
    hook = small.model.model.vqmodel.decoder.register_forward_hook(lambda _, args, out: decoded.append(out.shape[0]))
    try:
        if loop == "mixed":
            got = generate_mixed(small, requests, settings, loop=mixed_loop(small, pages=4000, page_size=4))
        else:
            got = generate_images(small, requests, dataclasses.replace(settings, loop="lockstep"))
    finally:
        hook.remove()
    assert all(result.redrawn_bands == [] for result in got)  # else a redraw adds its own decodes
    assert sum(decoded) == 5 * len(requests)
    for request, result in zip(requests, got):
        assert same(result, reference_staged(small, request, settings))


def test_host_calls_of_bands_ending_a_few_steps_apart_wait_for_each_other(small):
    """Bands that end a step apart, within HOST_WAIT steps: their host calls run as one round rather
    than a round each (every round stops the steps), and each program still gets its own result."""
    rounds = []

    def batch(items):
        rounds.append(list(items))
        return [-item for item in items]

    def program(n):
        yield [ImageStage(t2i_prompt_ids(small, PROMPTS[0]), n, GenerationSettings(), n_tokens=n)]
        [answer] = yield [HostCall(batch, n)]
        return answer

    lengths = list(range(2, 2 + HOST_WAIT))  # all prefilled in the first step, then one ends per step
    loop = MixedLoop(small, PagePool(small.language_model, 200, 4))
    assert loop.run(program(n) for n in lengths) == [-n for n in lengths]
    assert rounds == [lengths]


def test_no_more_programs_run_at_once_than_allowed_and_each_outcome_is_heard_when_it_comes(small):
    """With `max_programs` 2, a program starts only once another has returned; the images are the
    same as with every program at once, and `on_outcome` hears of each as its program returns."""
    running, most, heard = set(), [], []

    def program(n):
        running.add(n)
        most.append(len(running))
        [codes] = yield [ImageStage(t2i_prompt_ids(small, PROMPTS[n]), 100 + n, GenerationSettings(), n_tokens=2 + n)]
        running.discard(n)
        return codes

    capped = MixedLoop(small, PagePool(small.language_model, 200, 4), max_programs=2)
    got = capped.run((program(n) for n in range(5)), lambda i, codes: heard.append((i, set(running))))
    assert max(most) == 2
    assert [i for i, _ in heard] == [0, 1, 2, 3, 4] and all(i not in now for i, now in heard)
    most.clear()
    free = MixedLoop(small, PagePool(small.language_model, 200, 4)).run(program(n) for n in range(5))
    assert max(most) == 5 and all(torch.equal(a, b) for a, b in zip(got, free))


def test_texts_end_at_their_stop_token_wherever_it_falls(tiny64):
    """A stop token the tiny model does draw (random weights never draw their real one): texts end
    there, at different steps, and every other text runs on; each as the reference writes it."""
    stop = 55  # drawn by the first prompt as its 2nd token and by the second as its 8th
    bundle = copy.copy(tiny64)
    bundle.tokens = dataclasses.replace(tiny64.tokens, eos=stop)
    prompts = [TextPrompt(tiny64.encode(p * (i + 1)), seed=7 * i) for i, p in enumerate(PROMPTS)]
    loop = MixedLoop(bundle, PagePool(tiny64.language_model, pages=64, page_size=4), step_tokens=16)
    written = loop.run(ask_once(TextStage(p, 12, 1.0)) for p in prompts)
    assert written == [reference_text(tiny64, p, 12, 1.0, stop_id=stop) for p in prompts]
    assert sorted(len(w) for w in written)[:2] == [1, 7] and max(len(w) for w in written) == 12


def test_a_worker_engine_runs_mixed_settings_in_its_one_loop_and_keeps_it_across_calls(small):
    """`loop=mixed` through `generate_images` (what every worker calls): the engine's own loop draws the
    images the lockstep engine draws, and the next call runs in the same loop (its pages and graphs);
    `auto` on a CPU leaves it to the lockstep engine. After `release` (an out-of-memory error) a new
    loop is built."""
    settings = GenerationSettings(mode="twig", bands=3, think_max_tokens=5, loop="mixed")
    requests = requests_for(PROMPTS[:3])
    engine = Engine(small)
    first = generate_images(small, requests[:2], settings, engine=engine)
    loop = engine.mixed_loop()
    steps = loop.steps
    assert steps > 0
    second = generate_images(small, requests[2:], settings, engine=engine)
    assert engine.mixed_loop() is loop and loop.steps > steps
    lockstep = generate_images(small, requests, dataclasses.replace(settings, loop="lockstep"), engine=Engine(small))
    assert all(same(a, b) for a, b in zip(first + second, lockstep))
    steps = loop.steps
    generate_images(small, requests[:1], dataclasses.replace(settings, loop="auto"), engine=engine)
    assert loop.steps == steps
    engine.release()
    assert engine.mixed_loop() is not loop
