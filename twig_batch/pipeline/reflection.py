"""twig mode's reflection: after each band the model scores the partial image (0-100) and offers a
better description of the band; a band scoring under theta is redrawn once from that description.

The scorer only writes the answer text; reading it is ours (`read_reflection`), so a stand-in scorer
exercises the same parsing. An answer we cannot fully read never causes a redraw: it is accepted
and flagged (`parse_failed`, with the `problem`), since acting on half an answer would be guessing.
`ModelScorer` is also a `CanvasQuestions`, so the staged loop may answer its prompts in the same text
call as the next band's thoughts.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Protocol

import torch

from twig_batch.pipeline.bands import band_part
from twig_batch.pipeline.understanding import CanvasQuestions
from twig_batch.settings import GenerationSettings

_SCORE = re.compile(r"\bscore\b\s*[:=\-]?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BETTER = re.compile(r"\b(?:better|improved|description)\b[^:=\n]{0,20}[:=]\s*(.*\S)", re.IGNORECASE)


@dataclass(frozen=True)
class Reflection:
    band: int  # 0-based
    score: float | None
    improved: str | None
    accepted: bool
    parse_failed: bool
    problem: str | None  # why the answer could not be used: unparseable, score out of range, missing ...
    answer: str  # the scorer's text, verbatim

    def record(self) -> dict:
        return dataclasses.asdict(self)


def read_reflection(answer: str, band: int, theta: float) -> Reflection:
    """Read 'Score: N' and 'Better: sentence' from an answer and decide whether the band stands."""
    score_match, better_match = _SCORE.search(answer), _BETTER.search(answer)
    score = float(score_match.group(1)) if score_match else None
    improved = better_match.group(1).strip() if better_match else None
    problem = None
    if score is None and not improved:
        problem = "unparseable"
    elif score is None:
        problem = "missing score"
    elif not math.isfinite(score) or not 0 <= score <= 100:
        problem = "score out of range"
    elif not improved:
        problem = "missing improved description"
    if problem is not None:
        return Reflection(band, score, improved or None, True, True, problem, answer)
    return Reflection(band, score, improved, score >= theta, False, None, answer)


@dataclass(frozen=True)
class ReflectionRequest:
    prompt: str
    band: int  # 0-based: the band just drawn
    bands: int
    thought: str  # the description band `band` was drawn from
    earlier: tuple[str, ...]  # every thought so far, this band's included
    canvas: torch.Tensor  # uint8 [H, W, 3]: the partial image after the band
    seed: int = 0  # the image's seed


class Scorer(Protocol):
    def reflect(self, bundle, requests: list[ReflectionRequest], settings: GenerationSettings) -> list[str]:
        """One answer text per request (read with `read_reflection`)."""


class ModelScorer(CanvasQuestions):
    """Asks the model, looking at the canvas; greedy, up to `settings.think_max_tokens` new tokens."""

    kind = "reflection"

    def question(self, request: ReflectionRequest) -> str:
        return self.templates.reflect.format(
            prompt=request.prompt, part=band_part(self.templates, request.band, request.bands),
            band=request.band + 1, bands=request.bands, thought=request.thought, thoughts=" ".join(request.earlier))

    def reflect(self, bundle, requests: list[ReflectionRequest], settings: GenerationSettings) -> list[str]:
        return self.answer(bundle, self.prompts(bundle, requests), settings)
