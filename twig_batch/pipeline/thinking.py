"""twig mode's thoughts: before each band, one literal sentence about what that band should show.

The thought before the first band is written from the prompt alone; later thoughts also look at the
partial image (the canvas) through the understanding path. Greedy decoding, so a thought depends
only on the prompt, the earlier thoughts and the picture.

`Thinker` is the seam: anything with a `think` method can stand in for the model (tests use that).
`ModelThinker` is also a `CanvasQuestions`: the staged loop may write its thoughts in the same text
call as the reflections (through `prompts` and `answer`, not `think`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from twig_batch.pipeline.bands import band_part
from twig_batch.pipeline.understanding import CanvasQuestions
from twig_batch.settings import GenerationSettings


@dataclass(frozen=True)
class ThoughtRequest:
    prompt: str
    band: int  # 0-based
    bands: int
    earlier: tuple[str, ...]  # thoughts of the bands before this one
    canvas: torch.Tensor | None  # uint8 [H, W, 3] partial image; None before the first band
    seed: int = 0  # the image's seed


class Thinker(Protocol):
    def think(self, bundle, requests: list[ThoughtRequest], settings: GenerationSettings) -> list[str]:
        """One thought per request."""


class ModelThinker(CanvasQuestions):
    """Asks the model itself, all requests in one batch (or one at a time with `ReferenceText`)."""

    kind = "thought"

    def question(self, request: ThoughtRequest) -> str:
        t = self.templates
        fields = {"prompt": request.prompt, "part": band_part(t, request.band, request.bands),
                  "band": request.band + 1, "bands": request.bands}
        if request.canvas is None:
            return t.think_first.format(**fields)
        return t.think_next.format(**fields, thoughts=" ".join(request.earlier))

    def think(self, bundle, requests: list[ThoughtRequest], settings: GenerationSettings) -> list[str]:
        return self.answer(bundle, self.prompts(bundle, requests), settings)
