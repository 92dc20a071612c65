"""Janus's understanding path: pixels -> SigLIP vision model -> aligner -> features for the LM.

The features replace the embeddings of the image placeholders of an understanding prompt
(`prompts.chat_ids(..., image_tokens=bundle.understanding_tokens)`), as Janus does for a picture
in a conversation. `CanvasQuestions` is what the model-backed thinker and scorer share: questions
about the canvas, answered the same way, so that both can be answered in one text call.

Each prompt carries its row's noise seed, derived from the image's seed, the kind of text and the
band, and (when benchmarks emulate realistic lengths, `text_lengths.py`) the length its text stops at.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from twig_batch.engine.inputs import TextPrompt
from twig_batch.engine.transfer import to_device
from twig_batch.pipeline.text_generation import BatchedText
from twig_batch.pipeline.text_lengths import TextLengths, stops_for
from twig_batch.prompts import DEFAULT_TEMPLATES, Templates, chat_ids
from twig_batch.seeds import derive_seed
from twig_batch.settings import GenerationSettings


def vision_input(bundle, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, H, W, 3] (square) -> normalised pixel values [B, 3, S, S] at the vision size S,
    in the model's dtype.

    Prepared as DeepSeek's image processor prepares them: a picture of another size is resized as an
    8-bit image (PIL's bicubic), then rescaled by 1/255 (in float64, kept as float32) and normalised
    in float32, and cast to the model's dtype once. Rescaling and normalising in bf16 instead lands
    about half the grey levels one bf16 step away, enough to change a greedy token.
    """
    size = bundle.vision_px
    if pixels.shape[1] != size or pixels.shape[2] != size:
        resized = [Image.fromarray(p.numpy()).resize((size, size), Image.BICUBIC) for p in pixels.cpu()]
        pixels = torch.stack([torch.from_numpy(np.array(image)) for image in resized])
    x = (pixels.to(bundle.device, torch.float64) * (1 / 255)).to(torch.float32).permute(0, 3, 1, 2)
    mean = to_device(bundle.image_mean, torch.float32, x.device).view(1, 3, 1, 1)
    std = to_device(bundle.image_std, torch.float32, x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(bundle.dtype)


@torch.no_grad()
def image_features(bundle, pixels: torch.Tensor) -> torch.Tensor:
    """Aligned vision features [B, understanding_tokens, D] of uint8 images [B, H, W, 3]."""
    return bundle.model.model.get_image_features(vision_input(bundle, pixels)).pooler_output


def canvas_features(bundle, canvases: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Each canvas's vision features (None where there is no canvas), all canvases in one batch."""
    shown = [i for i, c in enumerate(canvases) if c is not None]
    if not shown:
        return [None] * len(canvases)
    features = image_features(bundle, torch.stack([canvases[i] for i in shown]))
    feature_of = {i: features[n] for n, i in enumerate(shown)}
    return [feature_of.get(i) for i in range(len(canvases))]


def featured_prompts(bundle, questions: list[str], features: list[torch.Tensor | None], templates: Templates,
                     seeds: list[int] | None = None, stops: list[int | None] | None = None) -> list[TextPrompt]:
    """One prompt per question; those with vision features show their picture before the question.
    The system text is the templates' for prompts with a picture or without (`Templates.system_for`).
    `seeds` and `stops` are the rows' noise seeds and `stop_after` lengths (default 0 and None)."""
    seeds = seeds or [0] * len(questions)
    stops = stops or [None] * len(questions)
    prompts = []
    for question, feature, seed, stop in zip(questions, features, seeds, stops):
        shown = bundle.understanding_tokens if feature is not None else 0
        ids = chat_ids(bundle, question, templates.system_for(picture=feature is not None), image_tokens=shown)
        prompts.append(TextPrompt(ids, feature, seed, stop))
    return prompts


def understanding_prompts(bundle, questions: list[str], canvases: list[torch.Tensor | None], templates: Templates,
                          seeds: list[int] | None = None, stops: list[int | None] | None = None) -> list[TextPrompt]:
    """One prompt per question; those with a canvas [H, W, 3] show it before the question.

    All canvases go through the vision model in one batch.
    """
    return featured_prompts(bundle, questions, canvas_features(bundle, canvases), templates, seeds, stops)


class CanvasQuestions:
    """The model asked about the canvas, greedily, up to `settings.think_max_tokens` new tokens.

    Subclasses name their `kind` of text and word the question (`question(request)`; a request has
    a `canvas`, None for none, its image's `seed` and its `band`). `prompts` and `answer` are the two
    halves of asking, apart so that a caller can put the prompts of two askers into one text call
    when `shares_calls_with` says the answers would be the same. With `lengths`, each prompt stops at
    its emulated length (benchmarks only).
    """

    kind: str  # "thought" or "reflection": keys the rows' seeds and emulated lengths

    def __init__(self, templates: Templates = DEFAULT_TEMPLATES, text=None, lengths: TextLengths | None = None) -> None:
        self.templates = templates
        self.text = text or BatchedText()
        self.lengths = lengths

    def question(self, request) -> str:
        raise NotImplementedError

    def prompts(self, bundle, requests: list, features: list[torch.Tensor | None] | None = None) -> list[TextPrompt]:
        """One prompt per request; `features` are the requests' canvas features if already computed."""
        if features is None:
            features = canvas_features(bundle, [r.canvas for r in requests])
        seeds = [derive_seed(r.seed, self.kind, r.band) for r in requests]
        return featured_prompts(bundle, [self.question(r) for r in requests], features, self.templates,
                                seeds, stops_for(self.lengths, self.kind, seeds))

    def text_rule(self, settings: GenerationSettings) -> tuple[int, float]:
        """(most new tokens, temperature) of an answer: greedy."""
        return settings.think_max_tokens, 0.0

    def answer(self, bundle, prompts: list[TextPrompt], settings: GenerationSettings) -> list[str]:
        return self.text(bundle, prompts, *self.text_rule(settings))

    def shares_calls_with(self, other) -> bool:
        """Whether `other`'s prompts can go into this one's text calls: it answers the same way (greedy,
        same budget) with the very same text writer, and text rows do not depend on their batch."""
        return isinstance(other, CanvasQuestions) and other.text is self.text
