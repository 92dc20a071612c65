"""The reference's batched image-token loop: many images, CFG row pairs, left padding, per-row
positions and seeds, over transformers' dynamic cache (tests hold the fast engine to it).

Rows are laid out (cond_0, uncond_0, cond_1, uncond_1, ...; `engine/inputs.py`). Prompts of different lengths are
left-padded and masked; positions count real tokens only, so a row computes what it would alone.
Control tokens injected into some images take cache slots in every row but stay masked out (and
do not advance positions) for the images that were not injected, which therefore compute exactly
what they would without the injection.
"""
from __future__ import annotations

import torch

from twig_batch.engine.hooks import ImageTokenObserver
from twig_batch.engine.inputs import both_rows, cfg_prefill_inputs
from twig_batch.engine.sampling import draw_image_step
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.reference.forward import cached_forward, last_hidden, new_cache
from twig_batch.settings import GenerationSettings


@torch.no_grad()
def draw_image_tokens_batch(
    bundle, cond_rows: list[list[int]], seeds: list[int], settings: GenerationSettings, n_tokens: int,
    prefix_codes: torch.Tensor | None = None, first_step: int = 0, observer: ImageTokenObserver | None = None,
) -> torch.Tensor:
    """Codes [B, n_tokens]; image b matches `reference_image_tokens(bundle, cond_rows[b], seeds[b], ...)`.

    `prefix_codes` [B, n0]: image codes already drawn for each image (same n0 for all).
    """
    if len(cond_rows) != len(seeds):
        raise ValueError("one seed per image")
    device = bundle.device
    embeds, valid, positions = cfg_prefill_inputs(bundle, cond_rows, prefix_codes)
    mask = valid.long()
    lm = bundle.language_model
    cache = new_cache(lm)
    hidden = last_hidden(lm, cache, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    next_position = positions[:, -1:] + 1
    row_seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
    ones = torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)
    codes = []
    for i in range(n_tokens):
        step = first_step + i
        logits, tokens = draw_image_step(bundle, hidden, row_seeds, step, settings)
        codes.append(tokens)
        if observer is not None:
            injection = observer.observe(step, hidden[0::2], logits, tokens)
            if injection is not None and bool(injection.rows.any()):
                mask, next_position = _inject(bundle, cache, mask, next_position, injection)
        if i + 1 == n_tokens:
            break
        mask = torch.cat([mask, ones], dim=1)
        step_embeds = bundle.embed_image_codes(both_rows(tokens)).unsqueeze(1)
        hidden = last_hidden(lm, cache, inputs_embeds=step_embeds, attention_mask=mask, position_ids=next_position)
        next_position = next_position + 1
    return torch.stack(codes, dim=1).cpu()


def _inject(bundle, cache, mask, next_position, injection):
    """Append K control tokens to the injected images' row pairs (masked slots for the others)."""
    rows = both_rows(injection.rows.to(mask.device))  # [2B]
    k = injection.embeds.shape[1]
    control = both_rows(injection.embeds.to(bundle.device, bundle.dtype))
    slot_mask = rows.long().unsqueeze(1).expand(-1, k)
    mask = torch.cat([mask, slot_mask], dim=1)
    positions = next_position + torch.arange(k, device=mask.device)
    cached_forward(bundle.language_model, cache, inputs_embeds=control, attention_mask=mask, position_ids=positions)
    return mask, next_position + rows.long().unsqueeze(1) * k


def generate_plain_batch(bundle, prompts: list[str], seeds: list[int], settings: GenerationSettings,
                         observer: ImageTokenObserver | None = None) -> torch.Tensor:
    """Plain text-to-image codes [B, grid * grid]; row b matches `reference_plain(prompts[b], seeds[b])`."""
    rows = [t2i_prompt_ids(bundle, p) for p in prompts]
    return draw_image_tokens_batch(bundle, rows, seeds, settings, bundle.image_tokens, observer=observer)
