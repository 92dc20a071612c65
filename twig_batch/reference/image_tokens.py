"""The reference image loop: one image at a time, plain eager forward calls, nothing clever.

Every faster path is held to these functions token for token (tiny model, float64, CPU).
"""
from __future__ import annotations

import torch

from twig_batch.engine.hooks import ImageTokenObserver
from twig_batch.engine.sampling import draw_image_step
from twig_batch.prompts import t2i_prompt_ids, unconditional_ids
from twig_batch.reference.forward import cached_forward, last_hidden, new_cache
from twig_batch.settings import GenerationSettings


@torch.no_grad()
def reference_image_tokens(
    bundle, cond_ids: list[int], seed: int, settings: GenerationSettings, n_tokens: int,
    prefix_codes: torch.Tensor | None = None, first_step: int = 0, observer: ImageTokenObserver | None = None,
) -> torch.Tensor:
    """Sample `n_tokens` image codes for one image whose conditional text row is `cond_ids`.

    The CFG partner row is derived from it. `prefix_codes` [n] are image codes already drawn (they
    extend both rows); sampling step numbers continue from `first_step`, so a band's noise depends
    only on its place in the image. An `observer` may inject control tokens after any step.
    """
    lm = bundle.language_model
    pair = torch.tensor([cond_ids, unconditional_ids(cond_ids, bundle.tokens.pad)], device=bundle.device)
    embeds = bundle.embed_text(pair)
    if prefix_codes is not None and prefix_codes.numel():
        image = bundle.embed_image_codes(prefix_codes.to(bundle.device)).unsqueeze(0).expand(2, -1, -1)
        embeds = torch.cat([embeds, image], dim=1)
    cache = new_cache(lm)
    hidden = last_hidden(lm, cache, inputs_embeds=embeds)
    seeds = torch.tensor([seed], dtype=torch.int64)
    codes = []
    last = first_step + n_tokens - 1
    for step in range(first_step, last + 1):
        logits, token = draw_image_step(bundle, hidden, seeds, step, settings)
        codes.append(token)
        injection = None if observer is None else observer.observe(step, hidden[0:1], logits, token)
        if injection is not None and bool(injection.rows[0]):
            control = injection.embeds[0:1].to(bundle.device, bundle.dtype).expand(2, -1, -1)
            cached_forward(lm, cache, inputs_embeds=control)
        if step < last:
            step_embeds = bundle.embed_image_codes(token.to(bundle.device).repeat(2)).unsqueeze(1)
            hidden = last_hidden(lm, cache, inputs_embeds=step_embeds)
    return torch.cat(codes).cpu()


def cfg_pair(bundle, prompt: str) -> torch.Tensor:
    ids = t2i_prompt_ids(bundle, prompt)
    return torch.tensor([ids, unconditional_ids(ids, bundle.tokens.pad)], dtype=torch.long)


def reference_plain(bundle, prompt: str, seed: int, settings: GenerationSettings, observer=None) -> torch.Tensor:
    """Plain Janus-Pro text-to-image (SPEC §2) for one prompt: the image's codes [grid * grid]."""
    return reference_image_tokens(bundle, t2i_prompt_ids(bundle, prompt), seed, settings, bundle.image_tokens,
                                  observer=observer)
