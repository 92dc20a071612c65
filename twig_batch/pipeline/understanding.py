"""Janus's understanding path: pixels -> SigLIP vision model -> aligner -> features for the LM.

The features replace the embeddings of the image placeholders of an understanding prompt
(`prompts.chat_ids(..., image_tokens=bundle.understanding_tokens)`), as Janus does for a picture
in a conversation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from twig_batch.pipeline.text_generation import TextPrompt
from twig_batch.prompts import chat_ids


def vision_input(bundle, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, H, W, 3] (square) -> normalised pixel values [B, 3, S, S] at the vision size S."""
    x = pixels.to(bundle.device).permute(0, 3, 1, 2).to(bundle.dtype) / 255.0
    size = bundle.vision_px
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(bundle.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(bundle.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def image_features(bundle, pixels: torch.Tensor) -> torch.Tensor:
    """Aligned vision features [B, understanding_tokens, D] of uint8 images [B, H, W, 3]."""
    return bundle.model.model.get_image_features(vision_input(bundle, pixels)).pooler_output


def understanding_prompts(bundle, questions: list[str], canvases: list[torch.Tensor | None], system: str,
                          seeds: list[int] | None = None) -> list[TextPrompt]:
    """One prompt per question; those with a canvas [H, W, 3] show it before the question.

    All canvases go through the vision model in one batch.
    """
    seeds = seeds or [0] * len(questions)
    shown = [i for i, c in enumerate(canvases) if c is not None]
    features = image_features(bundle, torch.stack([canvases[i] for i in shown])) if shown else None
    feature_of = {i: features[n] for n, i in enumerate(shown)}
    prompts = []
    for i, question in enumerate(questions):
        if i in feature_of:
            ids = chat_ids(bundle, question, system, image_tokens=bundle.understanding_tokens)
            prompts.append(TextPrompt(ids, feature_of[i], seeds[i]))
        else:
            prompts.append(TextPrompt(chat_ids(bundle, question, system), None, seeds[i]))
    return prompts
