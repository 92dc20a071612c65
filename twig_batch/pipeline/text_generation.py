"""Text generation for thoughts, reflections and guidance: a one-row reference and a batched loop.

The batched loop left-pads prompts, masks the padding and counts positions over real tokens only
(as the image engine does), and a row leaves the batch (its cache rows are dropped) as soon as it
writes the stop token or reaches its token budget: the call's limit, or the prompt's own
`stop_after` when smaller (`text_lengths.py`'s emulation of realistic lengths, which every text
writer honours as if the stop token came next). Sampled text draws its noise from the row's own
seed and the token's index (STREAM_TEXT), so a row writes exactly what it would write alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from twig_batch.engine.batched import pad_left
from twig_batch.engine.cached_forward import cached_forward
from twig_batch.engine.sampling import sample_tokens
from twig_batch.seeds import STREAM_TEXT


@dataclass(frozen=True)
class TextPrompt:
    ids: list[int]
    image_features: torch.Tensor | None = None  # [placeholders, D]: replaces the image-placeholder embeddings
    seed: int = 0  # noise seed when sampling (temperature > 0)
    stop_after: int | None = None  # stop after this many tokens, as if the stop token came next

    def __post_init__(self) -> None:
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be at least 1, got {self.stop_after}")

    def budget(self, max_new_tokens: int) -> int:
        """The most tokens this prompt writes in a call limited to `max_new_tokens`."""
        return max_new_tokens if self.stop_after is None else min(self.stop_after, max_new_tokens)


def embed_prompts(bundle, ids: torch.Tensor, prompts: list[TextPrompt]) -> torch.Tensor:
    """Token embeddings [B, W, D] with each prompt's vision features scattered into its placeholders."""
    embeds = bundle.embed_text(ids)
    for row, prompt in enumerate(prompts):
        if prompt.image_features is None:
            continue
        slots = ids[row] == bundle.tokens.image
        features = prompt.image_features.to(embeds.device, embeds.dtype)
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"prompt has {int(slots.sum())} image placeholders for {features.shape[0]} features")
        embeds[row, slots] = features
    return embeds


def text_prefill_inputs(bundle, prompts: list[TextPrompt]):
    """The prompts left-padded into one batch: input embeddings [B, W, D] (vision features in their
    placeholders), which columns are real [B, W] (1/0) and each row's positions over its real tokens."""
    ids, mask = pad_left([p.ids for p in prompts], bundle.tokens.pad)
    ids, mask = ids.to(bundle.device), mask.to(bundle.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return embed_prompts(bundle, ids, prompts), mask, positions


@torch.no_grad()
def reference_text(bundle, prompt: TextPrompt, max_new_tokens: int, temperature: float = 0.0,
                   stop_id: int | None = None) -> list[int]:
    """New token ids for one prompt (the stop token not included): plain forward calls, one row."""
    stop = bundle.tokens.eos if stop_id is None else stop_id
    lm = bundle.language_model
    ids = torch.tensor([prompt.ids], device=bundle.device)
    cache = DynamicCache(config=lm.config)
    hidden = cached_forward(lm, cache, inputs_embeds=embed_prompts(bundle, ids, [prompt])).last_hidden_state[:, -1]
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
        hidden = cached_forward(lm, cache, inputs_embeds=step_embeds).last_hidden_state[:, -1]
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
    cache = DynamicCache(config=lm.config)
    hidden = cached_forward(lm, cache, inputs_embeds=embeds, attention_mask=mask,
                            position_ids=positions).last_hidden_state[:, -1]
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
        hidden = cached_forward(lm, cache, inputs_embeds=step_embeds, attention_mask=mask,
                                position_ids=next_position).last_hidden_state[:, -1]
        next_position = next_position + 1
    return written


def clean_text(bundle, ids: list[int]) -> str:
    """The decoded text (special tokens dropped), trimmed at both ends."""
    return bundle.decode(ids).strip()


class BatchedText:
    """Writes the texts of many prompts in one batched call of `generate` (any function with
    `generate_text_batch`'s contract, e.g. an engine over a static cache)."""

    def __init__(self, generate=generate_text_batch) -> None:
        self.generate = generate

    def __call__(self, bundle, prompts: list[TextPrompt], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        return [clean_text(bundle, ids) for ids in self.generate(bundle, prompts, max_new_tokens, temperature)]


class ReferenceText:
    """Writes the texts one prompt at a time with `reference_text` (the readable reference path)."""

    def __call__(self, bundle, prompts: list[TextPrompt], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        return [clean_text(bundle, reference_text(bundle, p, max_new_tokens, temperature)) for p in prompts]
