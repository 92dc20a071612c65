"""Batched plain generation: many prompts, CFG row pairs, left padding, per-row positions and seeds.

Rows are laid out (cond_0, uncond_0, cond_1, uncond_1, ...). Prompts of different lengths are
left-padded and masked; positions count real tokens only, so a row computes what it would alone.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from twig_batch.engine.sampling import guided_logits, sample_tokens
from twig_batch.prompts import t2i_prompt_ids, unconditional_ids
from twig_batch.settings import GenerationSettings


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


@torch.no_grad()
def generate_plain_batch(bundle, prompts: list[str], seeds: list[int], settings: GenerationSettings) -> torch.Tensor:
    """Codes [B, grid * grid] for B prompts; row b uses seeds[b] and matches `reference_plain`."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    device = bundle.device
    rows: list[list[int]] = []
    for prompt in prompts:
        ids = t2i_prompt_ids(bundle, prompt)
        rows += [ids, unconditional_ids(ids, bundle.tokens.pad)]
    ids, mask = pad_left(rows, bundle.tokens.pad)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lm = bundle.language_model
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=bundle.embed_text(ids), attention_mask=mask, position_ids=positions,
             past_key_values=cache, use_cache=True)
    hidden = out.last_hidden_state[:, -1]
    next_position = positions[:, -1:] + 1
    row_seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
    ones = torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)
    codes = []
    for step in range(bundle.image_tokens):
        logits = guided_logits(bundle.image_logits(hidden), settings.cfg_weight)
        tokens = sample_tokens(logits, row_seeds, step, settings.temperature, settings.top_k, settings.top_p)
        codes.append(tokens)
        if step + 1 == bundle.image_tokens:
            break
        mask = torch.cat([mask, ones], dim=1)
        step_embeds = bundle.embed_image_codes(tokens.repeat_interleave(2)).unsqueeze(1)
        hidden = lm(inputs_embeds=step_embeds, attention_mask=mask, position_ids=next_position,
                    past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        next_position = next_position + 1
    return torch.stack(codes, dim=1).cpu()
