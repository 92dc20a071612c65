"""The staged modes for one image, as a plain loop: the reference `generate_staged` is held to.

Image tokens come from `reference_image_tokens`, texts from `ReferenceText` (one prompt at a time),
so nothing here is batched.
"""
from __future__ import annotations

import torch

from twig_batch.imaging import to_pil
from twig_batch.pipeline.bands import BandSchedule, band_label, band_pixels, canvas_pixels
from twig_batch.pipeline.request import ImageRequest, ImageResult
from twig_batch.pipeline.guidance import GuidanceRequest, ModelGuide
from twig_batch.pipeline.modes import condition_text, redraw_seed
from twig_batch.pipeline.reflection import ModelScorer, ReflectionRequest, read_reflection
from twig_batch.pipeline.text_lengths import emulated_text_lengths
from twig_batch.pipeline.thinking import ModelThinker, ThoughtRequest
from twig_batch.prompts import DEFAULT_TEMPLATES, Templates, t2i_prompt_ids
from twig_batch.reference.image_tokens import reference_image_tokens
from twig_batch.reference.texts import ReferenceText
from twig_batch.settings import GenerationSettings


@torch.no_grad()
def reference_staged(bundle, request: ImageRequest, settings: GenerationSettings, observer=None, *,
                     templates: Templates | None = None, thinker=None, scorer=None, guide=None) -> ImageResult:
    """One image in `settings.mode`; the observer sees it as image 0. Timings are not recorded."""
    schedule = BandSchedule(bundle.grid, settings.bands)
    templates = templates or DEFAULT_TEMPLATES
    lengths = emulated_text_lengths()
    thinker = thinker or ModelThinker(templates, ReferenceText(), lengths)
    scorer = scorer or ModelScorer(templates, ReferenceText(), lengths)
    guide = guide or ModelGuide(templates, ReferenceText(), lengths)
    mode, bands, prompt = settings.mode, schedule.bands, request.prompt.strip()  # as `generate_staged` shows it
    texts: list[str] = []  # one thought (twig) or stage plan (seed) per band
    reflections, redrawn, band_images = [], [], []
    codes = torch.zeros(0, dtype=torch.long)
    canvas = None

    def draw_band(band: int, seed: int) -> torch.Tensor:
        """The band's tokens, appended to the tokens of the bands above it."""
        start = schedule.start(band)
        condition = t2i_prompt_ids(bundle, condition_text(mode, templates, prompt, band, bands, texts))
        if observer is not None:
            observer.begin_band(images=[0], band=band)
        drawn = reference_image_tokens(bundle, condition, seed, settings, schedule.tokens_per_band,
                                       prefix_codes=codes[:start], first_step=start, observer=observer)
        return torch.cat([codes[:start], drawn])

    for band in range(bands):
        if mode == "twig":
            ask = ThoughtRequest(prompt, band, bands, tuple(texts), canvas if band > 0 else None, request.seed)
            texts.append(thinker.think(bundle, [ask], settings)[0])
        elif mode == "seed":
            texts.append(guide.guide(bundle, [GuidanceRequest(prompt, band, bands, request.seed)], settings)[0])

        codes = draw_band(band, request.seed)
        pixels = band_pixels(bundle, codes[None], schedule, band)
        canvas = canvas_pixels(bundle, codes[None])[0]
        band_images.append((band_label(band, bands), to_pil(pixels)[0]))

        if mode == "twig" and settings.reflect:
            ask = ReflectionRequest(prompt, band, bands, texts[band], tuple(texts), canvas, request.seed)
            verdict = read_reflection(scorer.reflect(bundle, [ask], settings)[0], band, settings.theta)
            reflections.append(verdict.record())
            if not verdict.accepted:
                texts[band] = verdict.improved
                redrawn.append(band)
                codes = draw_band(band, redraw_seed(request.seed, band))
                pixels = band_pixels(bundle, codes[None], schedule, band)
                canvas = canvas_pixels(bundle, codes[None])[0]
                band_images.append((band_label(band, bands, redrawn=True), to_pil(pixels)[0]))

    return ImageResult(request=request, codes=codes, image=to_pil(pixels)[0], mode=mode, band_images=band_images,
                       thoughts=texts, reflections=reflections, redrawn_bands=redrawn,
                       trigger_log=observer.trigger_log(0) if observer is not None else [])
