"""Injection per image: exactly K cache slots for the fired image, nothing at all for the others,
and every engine agrees with the reference token for token with the controller on (tiny, float64)."""
import pytest
import torch

from twig_batch.controller import ControllerConfig, LatentController
from twig_batch.reference.batched import draw_image_tokens_batch
from twig_batch.reference.forward import cache_argument
from twig_batch.engine.fast import draw_image_tokens_fast
from twig_batch.reference.image_tokens import reference_image_tokens
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "blue sky over a long river with many clouds and a tiny boat", "cat"]
SEEDS = [11, 12, 13]
# Only forced fires (every 32 steps): the natural branches are switched off.
FORCED = dict(force_every=32, tau_drop=1e9, tau_entropy=1e9)


class Recorder:
    """Wraps an observer (or none) and keeps the guided logits the engine showed it at every step."""

    def __init__(self, inner=None):
        self.inner, self.logits = inner, []

    def begin_band(self, images, band):
        if self.inner is not None:
            self.inner.begin_band(images, band)

    def observe(self, step, hidden, logits, tokens):
        self.logits.append(logits.clone())
        return None if self.inner is None else self.inner.observe(step, hidden, logits, tokens)

    def trigger_log(self, image):
        return [] if self.inner is None else self.inner.trigger_log(image)


class CacheWatch:
    """Records, for every cached forward of the language model: (cache length before, new tokens, mask)."""

    def __init__(self, lm):
        self.calls = []
        self.handle = lm.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        cache = kwargs.get(cache_argument(type(module)))
        if cache is not None:
            mask = kwargs.get("attention_mask")
            self.calls.append((cache.get_seq_length(), kwargs["inputs_embeds"].shape[1],
                               None if mask is None else mask.sum(-1).clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_a_fired_image_gains_exactly_k_cache_slots_and_its_next_logits_change(tiny64):
    settings = GenerationSettings()
    ids = t2i_prompt_ids(tiny64, PROMPTS[0])
    plain, steered = Recorder(), Recorder(LatentController(tiny64, [PROMPTS[0]], ControllerConfig(**FORCED)))
    with CacheWatch(tiny64.language_model) as plain_watch:
        plain_codes = reference_image_tokens(tiny64, ids, 5, settings, 70, observer=plain)
    with CacheWatch(tiny64.language_model) as watch:
        codes = reference_image_tokens(tiny64, ids, 5, settings, 70, observer=steered)

    log = steered.trigger_log(0)
    assert [r["step"] for r in log if r["injected"]] == [31, 63]
    assert all(r["forced"] and r["fired"] for r in log if r["injected"])
    injections = [c for c in watch.calls if c[1] == 4]
    assert len(injections) == 2 and len(watch.calls) == len(plain_watch.calls) + 2
    decode = [c[0] for c in watch.calls if c[1] == 1]
    plain_decode = [c[0] for c in plain_watch.calls if c[1] == 1]
    # Decode call j feeds token j back; it sees 4 more cached positions per injection made at steps <= j.
    assert [a - b for a, b in zip(decode, plain_decode)] == [4 * ((j >= 31) + (j >= 63)) for j in range(69)]
    for i in range(32):
        assert torch.equal(steered.logits[i], plain.logits[i])
    assert not torch.allclose(steered.logits[32], plain.logits[32])
    assert torch.equal(codes[:32], plain_codes[:32])


@pytest.mark.parametrize("engine", [draw_image_tokens_batch, draw_image_tokens_fast], ids=["batched", "fast"])
def test_only_the_fired_image_changes_in_a_batch(tiny64, engine):
    settings = GenerationSettings()
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS]
    config = ControllerConfig(**FORCED, force_images=(1,))
    plain, steered = Recorder(), Recorder(LatentController(tiny64, PROMPTS, config))
    with CacheWatch(tiny64.language_model) as plain_watch:
        plain_codes = engine(tiny64, rows, SEEDS, settings, 40, observer=plain)
    with CacheWatch(tiny64.language_model) as watch:
        codes = engine(tiny64, rows, SEEDS, settings, 40, observer=steered)

    for b in (0, 2):  # never fired: bit for bit what they computed without the controller
        assert torch.equal(codes[b], plain_codes[b])
        assert all(torch.equal(x[b], y[b]) for x, y in zip(steered.logits, plain.logits))
        assert steered.trigger_log(b) and not any(r["fired"] for r in steered.trigger_log(b))
    assert [r["step"] for r in steered.trigger_log(1) if r["injected"]] == [31]
    assert all(torch.equal(steered.logits[i][1], plain.logits[i][1]) for i in range(32))
    assert not torch.allclose(steered.logits[32][1], plain.logits[32][1])
    if engine is draw_image_tokens_batch:  # its cache is transformers' own: visible slots per CFG row
        grown = [c[2] - p[2] for c, p in zip([c for c in watch.calls if c[1] == 1],
                                             [c for c in plain_watch.calls if c[1] == 1])]
        assert all(g.tolist() == ([0, 0, 4, 4, 0, 0] if j >= 31 else [0] * 6) for j, g in enumerate(grown))

    single = LatentController(tiny64, [PROMPTS[1]], ControllerConfig(**FORCED, force_images=(0,)))
    alone = reference_image_tokens(tiny64, rows[1], SEEDS[1], settings, 40, observer=single)
    assert torch.equal(codes[1], alone)


def _same_log(a, b):
    assert [(r["step"], r["fired"], r["injected"], r["forced"], r["band"]) for r in a] == \
        [(r["step"], r["fired"], r["injected"], r["forced"], r["band"]) for r in b]
    for x, y in zip(a, b):
        for key in ("s_t", "u_t", "var_s"):
            assert x[key] == pytest.approx(y[key], rel=1e-9, abs=1e-12)


def test_engines_with_the_natural_trigger_match_the_reference_token_for_token(tiny64):
    settings = GenerationSettings(top_k=100)
    config = ControllerConfig(min_gap=20)  # the tiny model is always unsure: fires, gated by the guard rails
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS]
    prefix = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(4))
    batched_ctl, fast_ctl = LatentController(tiny64, PROMPTS, config), LatentController(tiny64, PROMPTS, config)
    batched = draw_image_tokens_batch(tiny64, rows, SEEDS, settings, 90, prefix_codes=prefix, first_step=24,
                                      observer=batched_ctl)
    fast = draw_image_tokens_fast(tiny64, rows, SEEDS, settings, 90, prefix_codes=prefix, first_step=24,
                                  observer=fast_ctl)
    assert torch.equal(batched, fast)
    for b in range(3):
        ref_ctl = LatentController(tiny64, [PROMPTS[b]], config)
        ref = reference_image_tokens(tiny64, rows[b], SEEDS[b], settings, 90, prefix_codes=prefix[b], first_step=24,
                                     observer=ref_ctl)
        assert torch.equal(batched[b], ref)
        log = ref_ctl.trigger_log(0)
        assert sum(r["injected"] for r in log) >= 2  # the comparison covers injections
        _same_log(batched_ctl.trigger_log(b), log)
        _same_log(fast_ctl.trigger_log(b), log)
