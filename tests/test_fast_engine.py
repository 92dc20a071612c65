"""The static-cache engine against the reference, token for token (tiny model, float64)."""
import torch

from twig_batch.reference.batched import draw_image_tokens_batch
from twig_batch.engine.fast import draw_image_tokens_fast
from twig_batch.engine.hooks import Injection
from twig_batch.reference.image_tokens import reference_image_tokens
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "blue sky over a long river with many clouds and a tiny boat", "cat"]


class ScriptedInjector:
    """Injects fixed control embeddings into chosen images at chosen steps."""

    def __init__(self, hidden_size, plan: dict[int, set[str]], images: list[str]):
        self.plan, self.images = plan, images
        self.embeds = torch.randn(len(images), 4, hidden_size, generator=torch.Generator().manual_seed(1),
                                  dtype=torch.float64)
        self.rows = images

    def begin_band(self, images, band):
        self.rows = [self.images[i] for i in images]

    def observe(self, step, hidden, logits, tokens):
        fire = torch.tensor([name in self.plan.get(step, set()) for name in self.rows])
        if not fire.any():
            return None
        index = [self.images.index(name) for name in self.rows]
        return Injection(self.embeds[index], fire)

    def trigger_log(self, image):
        return []


def test_fast_engine_matches_reference_with_prefix_and_padding(tiny64):
    settings = GenerationSettings(top_k=100)
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS]
    prefix = torch.randint(0, 512, (3, 96), generator=torch.Generator().manual_seed(3))
    fast = draw_image_tokens_fast(tiny64, rows, [11, 12, 13], settings, 96, prefix_codes=prefix, first_step=96)
    for b in range(3):
        ref = reference_image_tokens(tiny64, rows[b], 11 + b, settings, 96, prefix_codes=prefix[b], first_step=96)
        assert torch.equal(fast[b], ref)


def test_injection_changes_only_the_injected_image(tiny64):
    settings = GenerationSettings(temperature=0.05)  # near-greedy: a changed cache shows in the tokens
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS]
    hidden = tiny64.model.config.text_config.hidden_size
    plan = {10: {"b"}, 40: {"b", "c"}}
    plain = draw_image_tokens_fast(tiny64, rows, [1, 2, 3], settings, 80)
    injected = draw_image_tokens_fast(tiny64, rows, [1, 2, 3], settings, 80,
                                      observer=ScriptedInjector(hidden, plan, ["a", "b", "c"]))
    batched = draw_image_tokens_batch(tiny64, rows, [1, 2, 3], settings, 80,
                                      observer=ScriptedInjector(hidden, plan, ["a", "b", "c"]))
    assert torch.equal(injected[0], plain[0])  # never injected
    assert torch.equal(injected[1][:11], plain[1][:11]) and not torch.equal(injected[1], plain[1])
    assert torch.equal(injected[2][:41], plain[2][:41]) and not torch.equal(injected[2], plain[2])
    assert torch.equal(injected, batched)
    for b, name in enumerate("abc"):
        single = ScriptedInjector(hidden, plan, [name])
        single.embeds = ScriptedInjector(hidden, plan, ["a", "b", "c"]).embeds[b:b + 1]
        ref = reference_image_tokens(tiny64, rows[b], b + 1, settings, 80, observer=single)
        assert torch.equal(injected[b], ref)


def test_an_injection_runs_over_the_injected_images_rows_only(tiny64, monkeypatch):
    """The cost of a fire is the fired images' tokens: with one image of three injected at a step, the
    step's redo (control tokens + the step's token) is one pass over that image's two CFG rows, and
    every other pass of the call is a whole-batch prefill or decode step."""
    from twig_batch.engine import fast

    passes = []
    forward_static = fast.forward_static

    def spy(lm, cache, embeds, *args, rows=None, **kwargs):
        passes.append((None if rows is None else rows.tolist(), embeds.shape[1]))
        return forward_static(lm, cache, embeds, *args, rows=rows, **kwargs)

    monkeypatch.setattr(fast, "forward_static", spy)
    hidden = tiny64.model.config.text_config.hidden_size
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS]
    draw_image_tokens_fast(tiny64, rows, [1, 2, 3], GenerationSettings(), 30,
                           observer=ScriptedInjector(hidden, {10: {"b"}, 20: {"a", "c"}}, ["a", "b", "c"]))
    subset = [(r, length) for r, length in passes if r is not None]
    k = ScriptedInjector(hidden, {}, ["a"]).embeds.shape[1]
    assert subset == [([2, 3], k + 1), ([0, 1, 4, 5], k + 1)]
    assert all(length == 1 for r, length in passes[1:] if r is None)  # the rest: one decode step each


def test_cache_holds_every_injection_the_controller_may_make(tiny64):
    from twig_batch.controller import LatentController
    from twig_batch.settings import ControllerConfig

    config = ControllerConfig(max_injections_per_band=20, min_gap=0, min_history=1, force_every=1)
    controller = LatentController(tiny64, PROMPTS[:1], config)
    codes = draw_image_tokens_fast(tiny64, [t2i_prompt_ids(tiny64, PROMPTS[0])], [1], GenerationSettings(), 40,
                                   observer=controller)
    assert codes.shape == (1, 40)
    assert sum(r["injected"] for r in controller.trigger_log(0)) == 20  # 80 control tokens: more than the default slack


def test_a_prefill_in_slices_of_rows_changes_no_token(tiny64, monkeypatch):
    from twig_batch.engine import static_decoder

    settings = GenerationSettings(top_k=100)
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS]
    prefix = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(5))
    whole = draw_image_tokens_fast(tiny64, rows, [4, 5, 6], settings, 24, prefix_codes=prefix, first_step=40)
    calls = []
    spied = static_decoder.forward_at
    monkeypatch.setattr(static_decoder, "forward_at", lambda lm, tensors, *a: calls.append(tensors.k.shape[1])
                        or spied(lm, tensors, *a))
    monkeypatch.setattr(static_decoder, "PREFILL_CHUNK_TOKENS", 100)  # a row of ~70 tokens per slice
    sliced = draw_image_tokens_fast(tiny64, rows, [4, 5, 6], settings, 24, prefix_codes=prefix, first_step=40)
    assert calls[:6] == [1] * 6  # the prefill of 6 CFG rows went one row at a time
    assert torch.equal(whole, sliced)
