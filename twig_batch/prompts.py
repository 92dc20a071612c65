"""Every prompt the model sees, in one place.

Text-to-image follows Janus-Pro's chat format: a user turn, an empty assistant turn, then the
begin-of-image tag. The staged modes add their templates here too, and users may override any of
them from a JSON file (see `load_templates`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import string
from pathlib import Path

from twig_batch.errors import InputError

USER_TURN = "<|User|>: {text}\n\n<|Assistant|>:"


def t2i_prompt_ids(bundle, prompt: str) -> list[int]:
    """Token ids of the conditional row: BOS, the chat-formatted prompt, begin-of-image.

    The prompt is stripped of surrounding whitespace, as DeepSeek's chat template strips every turn.
    """
    return [bundle.tokens.bos, *bundle.encode(USER_TURN.format(text=prompt.strip())), bundle.tokens.boi]


def unconditional_ids(ids: list[int], pad_id: int) -> list[int]:
    """The CFG partner row: same length, every token but BOS (first) and begin-of-image (last) padded."""
    if len(ids) < 2:
        raise ValueError("a text-to-image prompt has at least BOS and begin-of-image")
    return [ids[0], *([pad_id] * (len(ids) - 2)), ids[-1]]


# ---------------------------------------------------------------------------------------------
# Staged modes (twig, seed): the questions put to the model and the text conditions of each band.
# Every field below is a str.format template; `TEMPLATE_FIELDS` lists the names each may use.

@dataclasses.dataclass(frozen=True, slots=True)
class Templates:
    # Put before the user turn of the prompts that show the picture (later thoughts, reflections).
    # None: the model's own, the system prompt DeepSeek's chat processor adds by default, which
    # Janus-Pro was trained with (`model_system_prompt`).
    system: str | None = None
    # Put before the user turn of the text-only prompts (the first thought, seed's stage plans): none,
    # as DeepSeek's chat template has by default and TwiG's first thought is asked.
    system_text_only: str = ""
    # Band names: a picture in 2 or 3 bands uses top / middle / bottom, in 1 band the whole, else numbers.
    part_top: str = "top part"
    part_middle: str = "middle part"
    part_bottom: str = "bottom part"
    part_whole: str = "whole image"
    part_numbered: str = "band {band} of {bands}"
    # twig: the thought before the first band (text only) and before later bands (with the picture).
    think_first: str = (
        'A picture of "{prompt}" will be drawn from the top down in {bands} horizontal bands. Write one short, '
        "literal sentence saying what the {part} should show. Use only what the prompt states or clearly implies: "
        "no new objects, details or backgrounds, and no labels such as band numbers or position names. Reply "
        "with that sentence alone."
    )
    think_next: str = (
        'A picture of "{prompt}" is being drawn from the top down in {bands} horizontal bands. The picture above '
        "shows the bands drawn so far; the rest is filler, not drawn yet. The bands so far were described as: "
        '"{thoughts}"\nWrite the next sentence only: one short, literal sentence about the new content the {part} '
        "should add, carrying on from what is already drawn. Repeat nothing that was said before. Use only what "
        "the picture shows or the prompt clearly implies; invent no new objects or textures. Where the picture "
        "and the earlier sentences disagree, follow the picture. No labels such as band numbers or position "
        "names. Reply with that sentence alone."
    )
    # twig: the check after each band: a calibrated score (the pass mark, theta, sets how often bands
    # are redrawn) and a better description. The answer is read for "Score:" and "Better:" (or
    # upstream's SCORE / IMPROVED_DESCRIPTION) by `reflection.read_reflection`.
    reflect: str = (
        'The picture above is being drawn from the top down in {bands} horizontal bands for the prompt "{prompt}". '
        'Band {band}, the {part}, was just drawn from the description "{thought}"; the descriptions of the bands '
        'so far, in order, read: "{thoughts}". Only the bands drawn so far are real: anything below them is '
        "filler standing for area not drawn yet, so leave it out of your judgement.\n"
        "First, score how well the {part} shows what the prompt and its description ask for: colours, whole "
        "objects, detail, placement, and how it joins the bands above. The band may hold only part of the "
        "prompt; judge it on what belongs in it. Give a whole number from 0 to 100 and use the whole range: exact "
        "values such as 67, 82 or 91, not round multiples of 5 or 10. Be strict; keep 95 and above for a band "
        "with no flaw at all.\n"
        "Second, write one improved sentence that describes only the {part}: mend the flaws you found, give "
        "concrete colours, textures, sizes and positions in plain literal words, add nothing the prompt does "
        "not call for, and do not name the band or use words such as top, middle, bottom, band, layer or "
        "section. Keep it consistent with the bands above, so that every object of the prompt is drawn in "
        "some band.\nAnswer in exactly two lines:\nScore: <number>\nBetter: <sentence>"
    )
    # twig: the text condition of band k's image tokens, from the thoughts of bands 1..k.
    twig_condition: str = "{thoughts}"
    # seed: the guidance written before each stage, and the stage's text condition.
    seed_guidance: str = (
        'You are an artist painting "{prompt}" in {bands} stages, from the top of the canvas down. '
        "Stage {band} paints the {part}. Briefly plan what to paint in this stage so that it fits the whole picture."
    )
    seed_stage: str = "{prompt}, {part}"

    def system_for(self, picture: bool) -> str:
        """The system text of an understanding prompt that shows the picture, or of a text-only one."""
        if not picture:
            return self.system_text_only
        return model_system_prompt() if self.system is None else self.system


TEMPLATE_FIELDS: dict[str, frozenset[str]] = {
    "system": frozenset(), "system_text_only": frozenset(),
    "part_top": frozenset(), "part_middle": frozenset(), "part_bottom": frozenset(), "part_whole": frozenset(),
    "part_numbered": frozenset({"band", "bands"}),
    "think_first": frozenset({"prompt", "part", "band", "bands"}),
    "think_next": frozenset({"prompt", "part", "band", "bands", "thoughts"}),
    "reflect": frozenset({"prompt", "part", "band", "bands", "thought", "thoughts", "earlier"}),
    "twig_condition": frozenset({"prompt", "thoughts"}),
    "seed_guidance": frozenset({"prompt", "part", "band", "bands"}),
    "seed_stage": frozenset({"prompt", "part", "guidance"}),
}

DEFAULT_TEMPLATES = Templates()


def _check_template(name: str, text: object) -> None:
    if name not in TEMPLATE_FIELDS:
        raise InputError(f"unknown template {name!r}; known: {', '.join(sorted(TEMPLATE_FIELDS))}")
    if not isinstance(text, str):
        raise InputError(f"template {name!r} must be a string, got {type(text).__name__}")
    try:
        parsed = [(field, spec) for _, field, spec, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as exc:
        raise InputError(f"template {name!r} is not a valid format string: {exc}") from None
    # Only plain named fields: positional ({}) or attribute/index access ({a.b}, {a[0]}) are refused.
    unknown = sorted({field for field, _ in parsed} - TEMPLATE_FIELDS[name])
    if unknown:
        allowed = ", ".join("{" + f + "}" for f in sorted(TEMPLATE_FIELDS[name])) or "none"
        shown = ", ".join("{" + f + "}" for f in unknown)
        raise InputError(f"template {name!r} uses {shown}; allowed fields: {allowed}")
    # A format spec is formatted too, so a field inside one ({band:{prompt.__class__}}) would reach
    # attributes of the values, or hand each prompt over as a format spec ({prompt:{prompt}}).
    nested = [f"{{{field}:{spec}}}" for field, spec in parsed if spec and ("{" in spec or "}" in spec)]
    if nested:
        raise InputError(f"template {name!r} holds a field inside a format spec ({nested[0]}); a format spec "
                         "may not hold fields")
    # A spec that does not fit its value ({prompt:d}) would fail on every actor: try it here, on values of
    # the types the pipeline passes.
    try:
        text.format(**{field: _SAMPLE_VALUES[field] for field in TEMPLATE_FIELDS[name]})
    except (ValueError, TypeError) as exc:
        raise InputError(f"template {name!r} cannot be filled in: {exc}") from None


# One value of the type each field has when the pipeline fills a template in (band numbers count from 1).
_SAMPLE_VALUES = {"prompt": "a red cube", "part": "top part", "band": 1, "bands": 3, "thought": "a red cube",
                  "thoughts": "a red cube", "earlier": "a red cube", "guidance": "a red cube"}


def load_templates(path: str | Path, base: Templates = DEFAULT_TEMPLATES) -> Templates:
    """Templates from a JSON object {name: template}; names it leaves out keep their defaults."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read the templates file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputError(f"the templates file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"the templates file {path} must hold a JSON object of name -> template")
    for name, text in data.items():
        _check_template(name, text)
    return dataclasses.replace(base, **data)


def chat_ids(bundle, question: str, system: str = "", image_tokens: int = 0) -> list[int]:
    """An understanding prompt: BOS, the system text, the user turn (an image block first, when given),
    the assistant cue.

    The image block is begin-of-image, `image_tokens` placeholders (the vision features replace their
    embeddings) and end-of-image, as Janus lays an image out in a conversation. The text between
    special tokens is tokenized in one piece, as DeepSeek's processor tokenizes the whole
    conversation: tokenizing "<|User|>: " apart from the question would end it in a lone space token
    where the model saw " word". The question is stripped, as DeepSeek's chat template strips turns.
    """
    before, after = USER_TURN.split("{text}")
    t = bundle.tokens
    question = question.strip()
    if not image_tokens:
        return [t.bos, *bundle.encode(system + before + question + after)]
    return [t.bos, *bundle.encode(system + before), t.boi, *([t.image] * image_tokens), t.eoi,
            *bundle.encode("\n" + question + after)]


@functools.cache
def model_system_prompt() -> str:
    """Janus-Pro's own system prompt, the one DeepSeek's chat processor puts before a conversation by
    default and the model was trained with; transformers' Janus processor carries the same text."""
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    return DEFAULT_SYSTEM_PROMPT
