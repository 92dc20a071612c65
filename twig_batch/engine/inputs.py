"""What a drawing or writing call feeds the model: left-padded rows, their positions, their embeddings.

Both tiers build their inputs here, so the fast engine and the reference read the same rows. Prompts
of different lengths are left-padded and masked; positions count real tokens only, so a row
computes what it would alone. An image is two rows (`cfg_rows`): conditional, then unconditional.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from twig_batch.engine.transfer import to_device
from twig_batch.prompts import unconditional_ids


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


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def both_rows(per_image: torch.Tensor) -> torch.Tensor:
    """Per-image values [B, ...] as per-row values [2B, ...]: each image's value on both of its CFG rows."""
    return per_image.repeat_interleave(2, dim=0)


def cfg_rows(images: torch.Tensor) -> torch.Tensor:
    """The cache rows of `images`: image i holds rows 2i (conditional) and 2i + 1 (unconditional)."""
    return (images.unsqueeze(1) * 2 + torch.arange(2, device=images.device)).flatten()


def cfg_prefill_inputs(bundle, cond_rows: list[list[int]], prefix_codes: torch.Tensor | None):
    """The prefill of B images as 2B rows (cond_0, uncond_0, ...): left-padded input embeddings
    [2B, W, D], which columns are real [2B, W] (bool) and each row's positions [2B, W]."""
    device = bundle.device
    rows: list[list[int]] = []
    for ids in cond_rows:
        rows += [ids, unconditional_ids(ids, bundle.tokens.pad)]
    ids, mask = pad_left(rows, bundle.tokens.pad)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    valid = mask.bool()
    embeds = bundle.embed_text(ids)
    if prefix_codes is not None and prefix_codes.numel():
        image = both_rows(bundle.embed_image_codes(prefix_codes.to(device)))
        n0 = image.shape[1]
        embeds = torch.cat([embeds, image], dim=1)
        valid = torch.cat([valid, torch.ones((valid.shape[0], n0), dtype=torch.bool, device=device)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, n0 + 1, device=device)], dim=1)
    return embeds, valid, positions


def embed_prompts(bundle, ids: torch.Tensor, prompts: list[TextPrompt]) -> torch.Tensor:
    """Token embeddings [B, W, D] with each prompt's vision features scattered into its placeholders."""
    embeds = bundle.embed_text(ids)
    width = ids.shape[1]
    for row, prompt in enumerate(prompts):
        if prompt.image_features is None:
            continue
        # The placeholders' columns from the host's ids (the row is left-padded to `width`): asking
        # the device which columns they are would wait for everything queued on it.
        slots = [width - len(prompt.ids) + i for i, token in enumerate(prompt.ids) if token == bundle.tokens.image]
        features = prompt.image_features.to(embeds.device, embeds.dtype)
        if len(slots) != features.shape[0]:
            raise ValueError(f"prompt has {len(slots)} image placeholders for {features.shape[0]} features")
        embeds[row, to_device(slots, torch.long, embeds.device)] = features
    return embeds


def text_prefill_inputs(bundle, prompts: list[TextPrompt]):
    """The prompts left-padded into one batch: input embeddings [B, W, D] (vision features in their
    placeholders), which columns are real [B, W] (1/0) and each row's positions over its real tokens."""
    ids, mask = pad_left([p.ids for p in prompts], bundle.tokens.pad)
    ids, mask = ids.to(bundle.device), mask.to(bundle.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return embed_prompts(bundle, ids, prompts), mask, positions
