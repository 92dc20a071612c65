"""Every KV cache a generation builds holds its worst case (tiny model, float64).

The worst case: several images per call, the controller injecting every time its guard rails allow,
each image at steps of its own, the longest prompt the prompt check accepts, every text at its token
budget (random tiny weights never write end-of-sequence), every band redrawn, custom templates. No
cache may overflow, and each image must still be what it is alone and what the reference loop draws.
Caches are made exactly as wide as their call asks (no KV arena), so none can hide an overflow in
spare columns.
"""
import json

import pytest
import torch

from twig_batch.controller import ControllerConfig, LatentController
from twig_batch.engine import static_decoder
from twig_batch.engine.fast import draw_image_tokens_fast
from twig_batch.engine.fused import FastModel
from twig_batch.engine.kv_arena import KVArenas
from twig_batch.engine.hooks import Injection
from twig_batch.reference.image_tokens import reference_image_tokens, reference_plain
from twig_batch.model import load_janus
from twig_batch.pipeline import ImageRequest, generate_images
from twig_batch.pipeline.sequences import PromptBudget
from twig_batch.pipeline.staged import generate_staged
from twig_batch.reference.staged import reference_staged
from twig_batch.prompts import load_templates, t2i_prompt_ids
from twig_batch.settings import GenerationSettings

K, MOST = 4, 4  # control tokens per injection, injections per image and call
PROMPTS = ["a red cube", "blue sky over a long river with many clouds and a tiny boat", "cat",
           "a dog on a bridge"]


class _NoArena:
    def lend(self, *args):
        return None


@pytest.fixture(autouse=True)
def exact_caches(monkeypatch):
    """No KV arena: it lends caches as wide as its buffer, wider than asked."""
    monkeypatch.setattr(KVArenas, "for_dtype", lambda arenas, dtype: _NoArena())


@pytest.fixture(scope="module")
def fused64(tiny_hf_dir):
    """Its own copy of the model (joining makes the modules' weights views of the joined ones) and the
    model with joined projections the engine would run."""
    bundle = load_janus(str(tiny_hf_dir), "cpu", torch.float64)
    return bundle, FastModel.compiled(bundle.language_model)


# ------------------------------------------------------------------------------------------------
# The engine: a scripted observer fires each image at steps of its own.

# Steps (counted from the call's first step) after whose token each image is injected: from the very
# first token on, back to back, spread out, at the last token, or never. 16 distinct steps in all.
PLAN = [(0, 1, 2, 3), (5, 11, 17, 23), (), (4, 6, 8, 10)]
N_TOKENS = 24


class Staggered:
    """Injects image b after the tokens of steps `first_step + plan[b]`, the same K embeddings each
    time, and reserves what a controller allowed MOST injections of K tokens would."""

    max_control_slots = MOST * K

    def __init__(self, hidden_size: int, first_step: int, images: list[int], plan=PLAN):
        self.first_step, self.images, self.plan = first_step, images, plan
        self.embeds = torch.randn(len(PROMPTS), K, hidden_size, generator=torch.Generator().manual_seed(7),
                                  dtype=torch.float64)

    def observe(self, step, hidden, logits, tokens):
        fire = torch.tensor([step - self.first_step in self.plan[b] for b in self.images])
        return Injection(self.embeds[self.images], fire) if fire.any() else None

    def trigger_log(self, image):
        return []


def _draw(bundle, settings, images, prefix, first_step, observe=True, plan=PLAN, model=None):
    rows = [t2i_prompt_ids(bundle, PROMPTS[b]) for b in images]
    hidden = bundle.model.config.text_config.hidden_size
    observer = Staggered(hidden, first_step, images, plan) if observe else None
    return draw_image_tokens_fast(bundle, rows, [20 + b for b in images], settings, N_TOKENS,
                                  prefix_codes=None if prefix is None else prefix[images], first_step=first_step,
                                  observer=observer, model=model)


@pytest.mark.parametrize("cache, prefix_tokens", [("model", 0), ("model", 12), ("fused", 12), ("fp8", 12)],
                         ids=["first-band", "re-prefill", "fused-re-prefill", "fp8-re-prefill"])
def test_images_firing_at_different_steps_fit_and_each_is_what_it_is_alone(tiny64, fused64, cache, prefix_tokens):
    bundle, model = fused64 if cache == "fused" else (tiny64, None)
    # Near-greedy: a changed cache shows in the tokens.
    settings = GenerationSettings(temperature=0.05, kv_cache="fp8" if cache == "fp8" else "model")
    everyone = list(range(len(PROMPTS)))
    prefix = None
    if prefix_tokens:  # a later band: the image so far is re-prefilled after the text
        prefix = torch.randint(0, 512, (len(PROMPTS), prefix_tokens), generator=torch.Generator().manual_seed(3))
    together = _draw(bundle, settings, everyone, prefix, prefix_tokens, model=model)
    untouched = _draw(bundle, settings, everyone, prefix, prefix_tokens, observe=False, model=model)
    for b in everyone:
        assert torch.equal(together[b], _draw(bundle, settings, [b], prefix, prefix_tokens, model=model)[0])
        # The injections are felt, and not before the token after the first one.
        first = PLAN[b][0] + 1 if PLAN[b] else N_TOKENS
        assert torch.equal(together[b, :first], untouched[b, :first])
        assert torch.equal(together[b], untouched[b]) == (not PLAN[b])
        if cache == "fp8":  # a precision of its own: held to batch invariance, not to the reference
            continue
        hidden = bundle.model.config.text_config.hidden_size
        reference = reference_image_tokens(tiny64, t2i_prompt_ids(tiny64, PROMPTS[b]), 20 + b, settings, N_TOKENS,
                                           prefix_codes=None if prefix is None else prefix[b],
                                           first_step=prefix_tokens, observer=Staggered(hidden, prefix_tokens, [b]))
        assert torch.equal(together[b], reference)


def test_an_observer_injecting_past_its_reservation_is_told_which_setting_bounds_it(tiny64):
    too_many = [tuple(range(MOST + 1))] + [()] * (len(PROMPTS) - 1)
    with pytest.raises(RuntimeError, match=r"image 0 .*max_control_slots"):
        _draw(tiny64, GenerationSettings(), [0, 1], None, 0, plan=too_many)


# ------------------------------------------------------------------------------------------------
# The pipeline: the latent controller itself, every mode, through the band loop.

# Image 1 is forced at every step its guard rails allow (its first MOST steps of every call); the
# others fire on any drop of their similarity (a window of 2 tokens makes it jitter), at steps of
# their own. The entropy branch is off.
CONFIG = ControllerConfig(tau_entropy=1e9, tau_drop=0.0, tau_var=0.0, min_history=1, min_gap=0, window=2,
                          max_injections_per_band=MOST, control_tokens=K, think_tokens=4096, force_every=1,
                          force_images=(1,))
CONTEXT = 1024  # a short context, so that the longest prompt it allows stays quick to draw
# Templates that repeat the prompt and put it (and the texts) into every image condition.
TEMPLATES = {
    "think_first": 'Picture "{prompt}" in {bands} bands. What goes in the {part}? Keep to "{prompt}".',
    "think_next": 'Picture "{prompt}", planned so far: {thoughts}. What does the {part} add?',
    "reflect": 'For "{prompt}" the {part} was drawn from "{thought}" after {thoughts}. Score: 0-100? Better:',
    "twig_condition": "{prompt}. {thoughts}",
    "seed_guidance": 'Paint "{prompt}" in {bands} stages; stage {band} is the {part}. Plan it.',
    "seed_stage": "{prompt}, {part}: {guidance}",
}


@pytest.fixture(scope="module")
def short(tiny_hf_dir):
    """The tiny model with a 6 x 6 token grid (3 bands of 12 tokens) and a short context."""
    bundle = load_janus(str(tiny_hf_dir), "cpu", torch.float64)
    bundle.model.config.vq_config.num_patches = 6
    bundle.model.config.text_config.max_position_embeddings = CONTEXT
    return bundle


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "templates.json"
    path.write_text(json.dumps(TEMPLATES))
    return load_templates(path)


@pytest.fixture
def positions(monkeypatch):
    """The largest position any pass over a static cache used."""
    seen = [0]
    forward_at = static_decoder.forward_at

    def spy(lm, tensors, embeds, at, *args, **kwargs):
        seen[0] = max(seen[0], int(at.max()))
        return forward_at(lm, tensors, embeds, at, *args, **kwargs)

    monkeypatch.setattr(static_decoder, "forward_at", spy)
    return seen


def longest_prompt(bundle, budget: PromptBudget) -> str:
    """A prompt of exactly the budget's limit in tokens."""
    words = "a small cat on a large table next to a lamp under the moon".split()
    text = ""
    while budget.count(text) < budget.limit:
        text = f"{text} {words[len(text.split()) % len(words)]}".strip()
    assert budget.count(text) == budget.limit and budget.problem(text) is None
    assert budget.problem(text + " cat") is not None
    return text


class RejectEveryBand:
    """Rejects every first drawing of every band: every band of every image is drawn twice."""

    def reflect(self, bundle, requests, settings):
        return ["Score: 10\nBetter: a small cat on a lamp" for _ in requests]


def _requests(prompts):
    return [ImageRequest(f"p{i}", p, i, 500 + i) for i, p in enumerate(prompts)]


def _same(a, b):
    assert torch.equal(a.codes, b.codes) and a.thoughts == b.thoughts and a.redrawn_bands == b.redrawn_bands
    assert [(r["band"], r["attempt"], r["step"], r["injected"]) for r in a.trigger_log] == \
        [(r["band"], r["attempt"], r["step"], r["injected"]) for r in b.trigger_log]


def _injections(trigger_log: list[dict]) -> dict[tuple[int, int], list[int]]:
    """(band, attempt) -> the steps injected at."""
    out: dict[tuple[int, int], list[int]] = {}
    for r in trigger_log:
        if r["injected"]:
            out.setdefault((r["band"], r["attempt"]), []).append(r["step"])
    return out


def _alone(index: int) -> ControllerConfig:
    """CONFIG for request `index` drawn alone (as image 0)."""
    forced = index in CONFIG.force_images
    return ControllerConfig(**{**CONFIG.to_dict(), "force_images": (0,), "force_every": CONFIG.force_every * forced})


def _generate(bundle, requests, settings, templates, scorer):
    """`generate_images`, the way a run calls it; with a stand-in scorer, the band loop it runs."""
    if scorer is None:
        return generate_images(bundle, requests, settings, templates=templates)
    controller = LatentController(bundle, [r.prompt for r in requests], settings.controller)
    return generate_staged(bundle, requests, settings, controller, templates=templates, scorer=scorer)


@pytest.mark.parametrize("mode", ["plain", "twig", "seed"])
def test_every_mode_at_its_largest_fits_every_cache(short, templates, positions, mode):
    settings = GenerationSettings(mode=mode, bands=3, think_max_tokens=6, guidance_max_tokens=6, controller=CONFIG)
    budget = PromptBudget(short, settings, templates)
    longest = longest_prompt(short, budget)
    requests = _requests([longest, "a red cube", longest])  # ragged prompts, and a second sample of one
    scorer = RejectEveryBand() if mode == "twig" else None  # twig: the most drawing calls, from improved thoughts
    results = _generate(short, requests, settings, templates, scorer)
    assert positions[0] < CONTEXT  # the prompt check's promise: nothing runs past the model's context

    injected = [_injections(result.trigger_log) for result in results]
    calls = {key for steps in injected for key in steps}
    assert len(calls) == {"plain": 1, "twig": 6, "seed": 3}[mode]
    for key in calls:  # as often as the guard rails allow, and at more steps than one image can take
        assert len(injected[1][key]) == MOST
        assert len({step for steps in injected for step in steps.get(key, [])}) > MOST

    for i, (request, result) in enumerate(zip(requests, results)):
        alone = GenerationSettings(**{**settings.to_dict(), "controller": _alone(i).to_dict()})
        [single] = _generate(short, [request], alone, templates, scorer)
        _same(result, single)
        controller = LatentController(short, [request.prompt], alone.controller)
        if mode == "plain":  # one pass over the whole image, as the band loop draws plain mode
            assert torch.equal(result.codes, reference_plain(short, request.prompt, request.seed, alone, controller))
            assert injected[i] == _injections(controller.trigger_log(0))
            continue
        staged = {} if scorer is None else {"scorer": scorer}
        _same(result, reference_staged(short, request, alone, controller, templates=templates, **staged))
