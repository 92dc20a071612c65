"""Every image of a call as its own program in one mixed loop: `generate_mixed`.

Same contract as `staged.generate_staged` (same requests, settings, askers and results, image for
image), but no image waits for another: each moves through its mode's stages on its own
(`programs.py`), its texts and bands in the same steps as every other image's
(`engine/mixed/loop.py`), its KV cache as long as what it holds (`engine/mixed/pages.py`).
"""
from __future__ import annotations

import torch

from twig_batch.engine.mixed.loop import MixedLoop
from twig_batch.engine.mixed.sizing import mixed_loop
from twig_batch.pipeline.guidance import ModelGuide
from twig_batch.pipeline.bands import BandSchedule
from twig_batch.pipeline.programs import Askers, HostWork, image_program
from twig_batch.pipeline.reflection import ModelScorer
from twig_batch.pipeline.request import ImageRequest, ImageResult
from twig_batch.pipeline.text_lengths import emulated_text_lengths
from twig_batch.pipeline.thinking import ModelThinker
from twig_batch.prompts import DEFAULT_TEMPLATES, Templates
from twig_batch.settings import GenerationSettings


@torch.no_grad()
def generate_mixed(bundle, requests: list[ImageRequest], settings: GenerationSettings, observer=None, *,
                   engine=None, templates: Templates | None = None, thinker=None, scorer=None, guide=None,
                   loop: MixedLoop | None = None, on_result=None) -> list[ImageResult]:
    """One image per request, as `generate_staged` draws it; `observer` (the latent controller, built
    for `requests`) watches every band of every image. `loop` runs them (a worker's is its engine's,
    `Engine.mixed_loop`; None: a new one over as many pages as the free memory holds, running
    `engine`'s model). `on_result(index, result)` hears of each image as soon as it is done."""
    if not requests:
        return []
    templates = templates or DEFAULT_TEMPLATES
    lengths = emulated_text_lengths()
    askers = Askers(templates, thinker or ModelThinker(templates, lengths=lengths),
                    scorer or ModelScorer(templates, lengths=lengths), guide or ModelGuide(templates, lengths=lengths))
    loop = loop or mixed_loop(bundle, None if engine is None else engine.model)
    work = HostWork(bundle, BandSchedule(bundle.grid, settings.bands))
    return loop.run((image_program(bundle, r, settings, askers, work, observer, i) for i, r in enumerate(requests)),
                    on_result)
