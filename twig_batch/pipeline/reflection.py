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

# Labels are found anywhere in the answer, in any case, and may carry a note in brackets
# ("Score (0-100): 87"). The score may sit in square brackets and end in "/100"; the description's
# label is "Better", "Improved description" or "IMPROVED_DESCRIPTION" (as upstream's template asks).
_GAP = r"[^\S\n]*"  # spaces and tabs, never a line break
_NOTE = rf"(?:\([^)\n]*\){_GAP})?"
_SCORE = re.compile(rf"(?<![a-z])score\b{_GAP}{_NOTE}(?:(?P<sep>[:=])\s*|-?{_GAP})\[?{_GAP}(?P<value>-?\d+(?:\.\d+)?)"
                    rf"(?:{_GAP}/{_GAP}(?P<scale>\d+(?:\.\d+)?))?", re.IGNORECASE)
_DESCRIPTION = re.compile(rf"(?<![a-z])(?:improved[ _]description|better[ _]description|improved|better|description)"
                          rf"\b{_GAP}{_NOTE}[:=]", re.IGNORECASE)
# Markdown emphasis around labels or values ("**Score:** 87", "__IMPROVED_DESCRIPTION__:").
_EMPHASIS = re.compile(r"\*\*|__(?=[A-Za-z:])|(?<=[A-Za-z:])__|`")
_PAIRS = {'"': '"', "'": "'", "[": "]", "(": ")", "\u201c": "\u201d"}


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
    """Read the score and the improved description from an answer and decide whether the band stands.

    Either order, either wording ("Score: 87" / "Better: ..." or "SCORE: 87" / "IMPROVED_DESCRIPTION:
    ..."); the description runs over as many lines as it takes, up to a score that follows it.
    """
    score, scale, improved = _read_answer(answer)
    problem = None
    if score is None and not improved:
        problem = "unparseable"
    elif score is None:
        problem = "missing score"
    elif scale is not None and scale != 100:
        problem = "score not out of 100"
    elif not math.isfinite(score) or not 0 <= score <= 100:
        problem = "score out of range"
    elif not improved:
        problem = "missing improved description"
    if problem is not None:
        return Reflection(band, score, improved or None, True, True, problem, answer)
    return Reflection(band, score, improved, score >= theta, False, None, answer)


def _read_answer(answer: str) -> tuple[float | None, float | None, str | None]:
    """(score, the scale it was given out of or None, improved description) of an answer; None where absent."""
    text = _EMPHASIS.sub("", answer)
    label = _DESCRIPTION.search(text)
    scores = list(_SCORE.finditer(text))
    # "Score: 87" outranks a bare "score 87", which may be words of the description itself. The score
    # is the first before the description's label or, failing that, the first after it, where the
    # description then ends.
    scores = [m for m in scores if m.group("sep")] or scores
    before = [m for m in scores if label is None or m.start() < label.start()]
    after = [m for m in scores if label is not None and m.start() >= label.end()]
    chosen = (before or after or [None])[0]
    improved = None
    if label is not None:
        end = chosen.start() if chosen is not None and chosen.start() >= label.end() else len(text)
        improved = _unwrap(" ".join(text[label.end():end].split()))
    if chosen is None:
        return None, None, improved
    scale = chosen.group("scale")
    return float(chosen.group("value")), float(scale) if scale else None, improved


def _unwrap(text: str) -> str:
    """A description without the quotes or brackets a model may put around the whole of it."""
    while len(text) >= 2 and _PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


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
            band=request.band + 1, bands=request.bands, thought=request.thought, thoughts=" ".join(request.earlier),
            earlier=" ".join(request.earlier[:request.band]))

    def reflect(self, bundle, requests: list[ReflectionRequest], settings: GenerationSettings) -> list[str]:
        return self.answer(bundle, self.prompts(bundle, requests), settings)
