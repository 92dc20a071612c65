"""The reference text loops for thoughts, reflections and guidance: one row, and a batched loop.

The batched loop left-pads prompts, masks the padding and counts positions over real tokens only
(as the image engine does), and a row leaves the batch (its cache rows are dropped) as soon as it
writes the stop token or reaches its token budget: the call's limit, or the prompt's own
`stop_after` when smaller (`text_lengths.py`'s emulation of realistic lengths, which every text
writer honours as if the stop token came next). Sampled text draws its noise from the row's own
seed and the token's index (STREAM_TEXT), so a row writes exactly what it would write alone.
"""
from __future__ import annotations

import torch

from twig_batch.engine.inputs import TextPrompt, embed_prompts, text_prefill_inputs
from twig_batch.engine.sampling import sample_tokens
from twig_batch.pipeline.text_generation import clean_text
from twig_batch.reference.forward import last_hidden, new_cache
from twig_batch.seeds import STREAM_TEXT


@torch.no_grad()
def reference_text(bundle, prompt: TextPrompt, max_new_tokens: int, temperature: float = 0.0,
                   stop_id: int | None = None) -> list[int]:
    """New token ids for one prompt (the stop token not included): plain forward calls, one row."""
    stop = bundle.tokens.eos if stop_id is None else stop_id
    lm = bundle.language_model
    ids = torch.tensor([prompt.ids], device=bundle.device)
    cache = new_cache(lm)
    hidden = last_hidden(lm, cache, inputs_embeds=embed_prompts(bundle, ids, [prompt]))
    seeds = torch.tensor([prompt.seed], dtype=torch.int64)
    written: list[int] = []
    budget = prompt.budget(max_new_tokens)
    for step in range(budget):
        token = sample_tokens(bundle.text_logits(hidden), seeds, step, temperature, stream=STREAM_TEXT)
        if int(token) == stop:
            break
        written.append(int(token))
        if len(written) == budget:
            break
        step_embeds = bundle.embed_text(token.to(bundle.device).view(1, 1))
        hidden = last_hidden(lm, cache, inputs_embeds=step_embeds)
    return written


@torch.no_grad()
def generate_text_batch(bundle, prompts: list[TextPrompt], max_new_tokens: int, temperature: float = 0.0,
                        stop_id: int | None = None) -> list[list[int]]:
    """New token ids per prompt; row b equals `reference_text(bundle, prompts[b], ...)`."""
    if not prompts:
        return []
    stop = bundle.tokens.eos if stop_id is None else stop_id
    device, lm = bundle.device, bundle.language_model
    embeds, mask, positions = text_prefill_inputs(bundle, prompts)
    cache = new_cache(lm)
    hidden = last_hidden(lm, cache, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    next_position = positions[:, -1:] + 1
    seeds = torch.tensor([p.seed for p in prompts], dtype=torch.int64)
    live = list(range(len(prompts)))  # prompt index of each row still in the batch
    written: list[list[int]] = [[] for _ in prompts]
    budgets = [p.budget(max_new_tokens) for p in prompts]
    for step in range(max(budgets)):
        tokens = sample_tokens(bundle.text_logits(hidden), seeds[live], step, temperature, stream=STREAM_TEXT)
        staying = []
        for row, token in enumerate(tokens.tolist()):
            if token == stop:
                continue
            written[live[row]].append(token)
            if len(written[live[row]]) < budgets[live[row]]:
                staying.append(row)
        if not staying:
            break
        if len(staying) < len(live):
            keep = torch.tensor(staying, device=device)
            cache.batch_select_indices(keep)
            mask, next_position, tokens = mask[keep], next_position[keep], tokens.to(device)[keep]
            live = [live[row] for row in staying]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_embeds = bundle.embed_text(tokens.to(device).view(-1, 1))
        hidden = last_hidden(lm, cache, inputs_embeds=step_embeds, attention_mask=mask, position_ids=next_position)
        next_position = next_position + 1
    return written


class ReferenceText:
    """Writes the texts one prompt at a time with `reference_text` (the readable reference path)."""

    def __call__(self, bundle, prompts: list[TextPrompt], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        return [clean_text(bundle, reference_text(bundle, p, max_new_tokens, temperature)) for p in prompts]
