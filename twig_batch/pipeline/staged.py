"""The band loop shared by every mode, over a whole batch of images in lockstep.

For each band: (twig) the images without a thought for it think; the band's image tokens are drawn
for all images in one batched call, re-prefilled from the band's text condition and the image tokens
so far (both CFG rows); the band images are decoded; (twig, reflect) every image is judged and the
rejected ones redraw the band once, together. `reference/staged.py` is the same loop for one image,
written plainly; the two give the same tokens and texts.

Text rows do not depend on their batch, so texts are asked for in as few calls as the data allows:
- seed: a stage plan never looks at a drawn band, so every plan of every image is one call, before
  the first band;
- twig with reflection: the reflection on band k and the thought for band k + 1 look at the same
  canvas, so (when the model writes both, with one text writer) they are one call and the canvas goes
  through the vision model once. That thought is speculative: an image whose band k is rejected drops
  it and thinks again after the redraw, since its plan and canvas have changed. With K bands and
  every band accepted that is K + 1 text calls instead of 2K.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from twig_batch.engine.runner import Engine
from twig_batch.imaging import to_pil
from twig_batch.pipeline.bands import BandSchedule, band_label, band_pixels, canvases_after
from twig_batch.pipeline.request import ImageRequest, ImageResult
from twig_batch.pipeline.guidance import GuidanceRequest, ModelGuide
from twig_batch.pipeline.modes import condition_text, redraw_seed
from twig_batch.pipeline.reflection import ModelScorer, ReflectionRequest, read_reflection
from twig_batch.pipeline.text_generation import BatchedText
from twig_batch.pipeline.text_lengths import emulated_text_lengths
from twig_batch.pipeline.thinking import ModelThinker, ThoughtRequest
from twig_batch.pipeline.understanding import CanvasQuestions, canvas_features
from twig_batch.prompts import DEFAULT_TEMPLATES, Templates, t2i_prompt_ids
from twig_batch.settings import GenerationSettings


class PhaseClock:
    """Per-image phase timings: a batched call's time is shared evenly by the prompts in it (one per
    image and phase), so the images' phase times add up to the wall time."""

    def __init__(self, n: int) -> None:
        self.timings: list[dict[str, float]] = [{} for _ in range(n)]

    def __call__(self, phase: str, images: list[int]):
        return self.shared((phase, images))

    @contextmanager
    def shared(self, *phases: tuple[str, list[int]]):
        """Times one call that serves several phases, each (phase, images): every phase is charged
        its number of prompts' share of the time."""
        start = time.perf_counter()
        yield
        share = (time.perf_counter() - start) / max(sum(len(images) for _, images in phases), 1)
        for phase, images in phases:
            for i in images:
                self.timings[i][phase] = self.timings[i].get(phase, 0.0) + share


def one_call_for_both(thinker, scorer) -> bool:
    """Whether reflections and thoughts can share a text call: the model writes both, with one text writer.
    Stand-ins are asked on their own, through `think` and `reflect`."""
    return isinstance(thinker, CanvasQuestions) and thinker.shares_calls_with(scorer)


@torch.no_grad()
def generate_staged(bundle, requests: list[ImageRequest], settings: GenerationSettings, observer=None, *,
                    engine=None, templates: Templates | None = None, thinker=None, scorer=None,
                    guide=None) -> list[ImageResult]:
    """Generate one image per request in `settings.mode` (plain, twig or seed), `settings.bands` bands.

    `thinker`, `scorer` and `guide` replace the model's own thoughts, reflections and stage plans.
    `observer` (the latent controller) hears `begin_band(images, band)` before every drawing call.
    `engine` draws the image tokens and writes the model's texts (`engine/runner.py`; default one
    built for `settings`): its `draw_image_tokens` and `write_texts` are all this loop asks of the
    device. The default thinker, scorer and guide share one text writer over it, so their texts may
    share calls; they stop at emulated lengths when `TWIG_BATCH_EMULATE_TEXT_LENGTHS` is set
    (benchmarks only, `text_lengths.py`).

    Plain mode draws the whole image in one pass (one prefill, as Janus-Pro's recipe does; the
    observer hears one band 0) and cuts its band images from the finished codes.
    """
    if not requests:
        return []
    schedule = BandSchedule(bundle.grid, settings.bands)
    templates = templates or DEFAULT_TEMPLATES
    engine = engine or Engine.for_settings(bundle, settings)
    text = BatchedText(engine)
    lengths = emulated_text_lengths()
    thinker = thinker or ModelThinker(templates, text, lengths)
    scorer = scorer or ModelScorer(templates, text, lengths)
    guide = guide or ModelGuide(templates, text, lengths)
    mode, bands, n = settings.mode, schedule.bands, len(requests)
    # The prompts as every text shows them: without surrounding whitespace, as DeepSeek's chat
    # template and TwiG's own code read theirs.
    prompt_texts = [r.prompt.strip() for r in requests]
    everyone = list(range(n))
    clock = PhaseClock(n)
    texts: list[list[str]] = [[] for _ in everyone]  # a thought (twig) or stage plan (seed) per band
    reflections: list[list[dict]] = [[] for _ in everyone]
    redrawn: list[list[int]] = [[] for _ in everyone]
    band_images: list[list] = [[] for _ in everyone]
    codes = torch.zeros((n, 0), dtype=torch.long)
    canvas = None  # uint8 [n, px, px, 3]: each image as drawn so far, undrawn positions as code 0
    think_while_reflecting = mode == "twig" and settings.reflect and one_call_for_both(thinker, scorer)

    def draw(rows: list[int], band: int, seeds: list[int], n_tokens: int = schedule.tokens_per_band) -> torch.Tensor:
        conditions = [t2i_prompt_ids(bundle, condition_text(mode, templates, prompt_texts[i], band, bands,
                                                            texts[i])) for i in rows]
        start = schedule.start(band)
        if observer is not None:
            observer.begin_band(images=rows, band=band)
        with clock("image_tokens_s", rows):
            return engine.draw_image_tokens(conditions, seeds, settings, n_tokens,
                                            prefix_codes=codes[rows, :start] if start else None, first_step=start,
                                            observer=observer)

    def plan_every_stage() -> None:
        asks = [GuidanceRequest(prompt_texts[i], band, bands, requests[i].seed) for band in range(bands) for i in everyone]
        with clock("guidance_s", everyone):
            plans = guide.guide(bundle, asks, settings)
        for i in everyone:
            texts[i] = plans[i::n]  # asked band by band, so image i's plans are every n-th from i

    def thought_request(i: int, band: int) -> ThoughtRequest:
        return ThoughtRequest(prompt_texts[i], band, bands, tuple(texts[i]), None if band == 0 else canvas[i],
                              requests[i].seed)

    def think(rows: list[int], band: int) -> None:
        with clock("thinking_s", rows):
            thoughts = thinker.think(bundle, [thought_request(i, band) for i in rows], settings)
        for i, thought in zip(rows, thoughts):
            texts[i].append(thought)

    def reflect(band: int) -> tuple[list[str], list[str]]:
        """Every image's reflection answer on `band` and, when one call can write both, every image's
        (speculative) thought for the next band; otherwise no thoughts."""
        asks = [ReflectionRequest(prompt_texts[i], band, bands, texts[i][band], tuple(texts[i]), canvas[i], r.seed)
                for i, r in enumerate(requests)]
        if not think_while_reflecting or band + 1 == bands:
            with clock("reflection_s", everyone):
                return scorer.reflect(bundle, asks, settings), []
        thought_asks = [thought_request(i, band + 1) for i in everyone]
        with clock.shared(("reflection_s", everyone), ("thinking_s", everyone)):
            features = canvas_features(bundle, [ask.canvas for ask in asks])  # both questions show this canvas
            prompts = scorer.prompts(bundle, asks, features) + thinker.prompts(bundle, thought_asks, features)
            answers = scorer.answer(bundle, prompts, settings)
        return answers[:n], answers[n:]

    for band in range(bands):
        if mode == "twig":
            # Everybody before the first band; later, whoever has no thought for the band yet: everybody
            # when thoughts are not written with the reflections, else those that redrew the band before.
            unthought = [i for i in everyone if len(texts[i]) == band]
            if unthought:
                think(unthought, band)
        elif mode == "seed" and band == 0:
            plan_every_stage()

        if mode != "plain":
            codes = torch.cat([codes, draw(everyone, band, [r.seed for r in requests])], dim=1)
        elif band == 0:
            codes = draw(everyone, 0, [r.seed for r in requests], n_tokens=bundle.image_tokens)
        looks_again = mode == "twig" and (settings.reflect or band + 1 < bands)
        with clock("decode_s", everyone):
            pixels = band_pixels(bundle, codes, schedule, band)
            canvas = canvases_after(bundle, codes, schedule, band, pixels) if looks_again else None
        for i, image in enumerate(to_pil(pixels)):
            band_images[i].append((band_label(band, bands), image))
        if mode != "twig" or not settings.reflect:
            continue

        answers, thoughts_ahead = reflect(band)
        verdicts = [read_reflection(answer, band, settings.theta) for answer in answers]
        for i, verdict in enumerate(verdicts):
            reflections[i].append(verdict.record())
        # A rejected image's speculative thought is dropped: it read the plan and canvas being replaced.
        for i, thought in enumerate(thoughts_ahead):
            if verdicts[i].accepted:
                texts[i].append(thought)
        again = [i for i, v in enumerate(verdicts) if not v.accepted]
        if not again:
            continue
        for i in again:
            texts[i][band] = verdicts[i].improved
            redrawn[i].append(band)
        codes[again, schedule.start(band):] = draw(again, band, [redraw_seed(requests[i].seed, band) for i in again])
        with clock("decode_s", again):
            pixels[again] = band_pixels(bundle, codes[again], schedule, band)
            canvas[again] = canvases_after(bundle, codes[again], schedule, band, pixels[again])
        for i in again:
            band_images[i].append((band_label(band, bands, redrawn=True), to_pil(pixels[i:i + 1])[0]))

    finals = to_pil(pixels)  # the last band's images are the whole images
    return [
        ImageResult(request=r, codes=codes[i].clone(), image=finals[i], mode=mode, band_images=band_images[i],
                    thoughts=texts[i], reflections=reflections[i], redrawn_bands=redrawn[i],
                    trigger_log=observer.trigger_log(i) if observer is not None else [], timings=clock.timings[i])
        for i, r in enumerate(requests)
    ]
