"""seed mode's stage guidance: for each stage the model, told it is an artist painting the
prompt in K stages, writes a short plan for the stage. Sampled, with noise from the image's seed and
the stage (so a plan never depends on the rest of the batch); text only, as in the owner's design.

A plan depends only on the prompt, the stage and the seed, never on what earlier stages drew, so the
staged loop asks for every stage's plan of every image in one call, before the first stage. With
`lengths` (benchmarks only, `text_lengths.py`) each plan stops at a length drawn from its row's seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from twig_batch.engine.inputs import TextPrompt
from twig_batch.pipeline.bands import band_part
from twig_batch.pipeline.text_generation import BatchedText
from twig_batch.pipeline.text_lengths import TextLengths, stops_for
from twig_batch.pipeline.understanding import understanding_prompts
from twig_batch.prompts import DEFAULT_TEMPLATES, Templates
from twig_batch.seeds import derive_seed
from twig_batch.settings import GenerationSettings


@dataclass(frozen=True)
class GuidanceRequest:
    prompt: str
    band: int  # 0-based stage
    bands: int
    seed: int  # the image's seed


class Guide(Protocol):
    def guide(self, bundle, requests: list[GuidanceRequest], settings: GenerationSettings) -> list[str]:
        """One stage plan per request."""


def guidance_seed(image_seed: int, band: int) -> int:
    return derive_seed(image_seed, "stage-guidance", band)


class ModelGuide:
    kind = "plan"

    def __init__(self, templates: Templates = DEFAULT_TEMPLATES, text=None, lengths: TextLengths | None = None) -> None:
        self.templates = templates
        self.text = text or BatchedText()
        self.lengths = lengths

    def question(self, request: GuidanceRequest) -> str:
        return self.templates.seed_guidance.format(
            prompt=request.prompt, part=band_part(self.templates, request.band, request.bands),
            band=request.band + 1, bands=request.bands)

    def prompts(self, bundle, requests: list[GuidanceRequest]) -> list[TextPrompt]:
        seeds = [guidance_seed(r.seed, r.band) for r in requests]
        return understanding_prompts(bundle, [self.question(r) for r in requests], [None] * len(requests),
                                     self.templates, seeds, stops_for(self.lengths, self.kind, seeds))

    def text_rule(self, settings: GenerationSettings) -> tuple[int, float]:
        """(most new tokens, temperature) of a plan."""
        return settings.guidance_max_tokens, settings.guidance_temperature

    def guide(self, bundle, requests: list[GuidanceRequest], settings: GenerationSettings) -> list[str]:
        return self.text(bundle, self.prompts(bundle, requests), *self.text_rule(settings))
