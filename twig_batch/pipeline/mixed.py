"""Every image of a call as its own program in one mixed loop: `generate_mixed`.

Same contract as `staged.generate_staged` (same requests, settings, askers and results, image for
image), but no image waits for another: each moves through its mode's stages on its own
(`programs.py`), its texts and bands in the same steps as every other image's
(`engine/mixed/loop.py`), its KV cache as long as what it holds (`engine/mixed/pages.py`).
"""
from __future__ import annotations

import torch

from twig_batch.engine.fused import FastModel
from twig_batch.engine.memory import HEADROOM, free_device_bytes, prefill_bytes_per_token
from twig_batch.engine.mixed.loop import MixedLoop
from twig_batch.engine.mixed.pages import PagePool
from twig_batch.pipeline.guidance import ModelGuide
from twig_batch.pipeline.bands import BandSchedule
from twig_batch.pipeline.programs import Askers, HostWork, image_program
from twig_batch.pipeline.reflection import ModelScorer
from twig_batch.pipeline.request import ImageRequest, ImageResult
from twig_batch.pipeline.text_lengths import emulated_text_lengths
from twig_batch.pipeline.thinking import ModelThinker
from twig_batch.prompts import DEFAULT_TEMPLATES, Templates
from twig_batch.settings import GenerationSettings

PAGE_SIZE = 16  # token slots per KV page
STEP_TOKENS = 2048  # tokens one step feeds at most: every decoding row, then prefill chunks
HOST_POOL_BYTES = 1 << 30  # the page pool off a GPU, where no free memory is measured


@torch.no_grad()
def generate_mixed(bundle, requests: list[ImageRequest], settings: GenerationSettings, observer=None, *,
                   engine=None, templates: Templates | None = None, thinker=None, scorer=None, guide=None,
                   loop: MixedLoop | None = None) -> list[ImageResult]:
    """One image per request, as `generate_staged` draws it; `observer` (the latent controller, built
    for `requests`) watches every band of every image. `loop` runs them (None: `mixed_loop(bundle,
    engine)`'s, over as many pages as the free memory holds)."""
    if not requests:
        return []
    templates = templates or DEFAULT_TEMPLATES
    lengths = emulated_text_lengths()
    askers = Askers(templates, thinker or ModelThinker(templates, lengths=lengths),
                    scorer or ModelScorer(templates, lengths=lengths), guide or ModelGuide(templates, lengths=lengths))
    loop = loop or mixed_loop(bundle, engine)
    work = HostWork(bundle, BandSchedule(bundle.grid, settings.bands))
    return loop.run(image_program(bundle, r, settings, askers, work, observer, i) for i, r in enumerate(requests))


def mixed_loop(bundle, engine=None, pages: int | None = None, page_size: int = PAGE_SIZE,
               step_tokens: int = STEP_TOKENS, profile: bool = False, fixed_steps: bool | None = None) -> MixedLoop:
    """A loop over `pages` KV pages of `page_size` slots (None: as many as the free memory holds, or
    `HOST_POOL_BYTES` worth off a GPU), running `engine`'s model (joined projections, compiled
    kernels) or the model as written; `fixed_steps` as `MixedLoop` takes it."""
    model = engine.model if engine is not None else FastModel.plain(bundle.language_model)
    pool = PagePool(bundle.language_model, pages or pages_that_fit(bundle, page_size, step_tokens), page_size)
    return MixedLoop(bundle, pool, model, step_tokens, profile=profile, fixed_steps=fixed_steps)


def pages_that_fit(bundle, page_size: int, step_tokens: int) -> int:
    """The pages the free memory holds after a step's activations (a share kept back as headroom)."""
    lm = bundle.language_model
    free = free_device_bytes(bundle.device)
    budget = HOST_POOL_BYTES if free is None else int(free * HEADROOM) - step_tokens * prefill_bytes_per_token(lm)
    return max(1, budget // PagePool.bytes_per_page(lm, page_size, bundle.dtype))
