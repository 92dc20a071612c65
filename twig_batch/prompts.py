"""Every prompt the model sees, in one place.

Text-to-image follows Janus-Pro's chat format: a user turn, an empty assistant turn, then the
begin-of-image tag. The staged modes add their templates here too, and users may override any of
them from a JSON file (see `load_templates`).
"""
from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path

from twig_batch.errors import InputError

USER_TURN = "<|User|>: {text}\n\n<|Assistant|>:"


def t2i_prompt_ids(bundle, prompt: str) -> list[int]:
    """Token ids of the conditional row: BOS, the chat-formatted prompt, begin-of-image."""
    return [bundle.tokens.bos, *bundle.encode(USER_TURN.format(text=prompt)), bundle.tokens.boi]


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
    # Put before the user turn of every understanding prompt (thoughts, reflections, guidance).
    system: str = "You look at pictures and talk about them plainly and briefly.\n\n"
    # Band names: a picture in 2 or 3 bands uses top / middle / bottom, in 1 band the whole, else numbers.
    part_top: str = "top part"
    part_middle: str = "middle part"
    part_bottom: str = "bottom part"
    part_whole: str = "whole image"
    part_numbered: str = "band {band} of {bands}"
    # twig: the thought before the first band (text only) and before later bands (with the picture).
    think_first: str = (
        'We are drawing a picture of "{prompt}" from the top down, in {bands} horizontal bands. '
        "In one plain, literal sentence, say what the {part} should show. Name only things that would be "
        "visible there, add nothing the prompt does not call for, and use no headings or labels."
    )
    think_next: str = (
        'We are drawing a picture of "{prompt}" from the top down, in {bands} horizontal bands. The picture '
        "above shows the bands finished so far; the rest is still blank. What we planned so far: {thoughts}\n"
        "In one plain, literal sentence, say only what the {part} should add. Carry on from what is already "
        "drawn; where the picture and the plan disagree, go by the picture. No headings, no labels, no new objects."
    )
    # twig: the check after each band. The answer is parsed for "Score:" and "Better:" lines.
    reflect: str = (
        'The picture above is being drawn from the top down for the prompt "{prompt}". Its {part} was just '
        'drawn from this description: "{thought}". How well does the {part} fit the prompt, from 0 to 100? '
        "Also write a better one-sentence description of the {part}. Answer in exactly two lines:\n"
        "Score: <number>\nBetter: <sentence>"
    )
    # twig: the text condition of band k's image tokens, from the thoughts of bands 1..k.
    twig_condition: str = "{thoughts}"
    # seed: the guidance written before each stage, and the stage's text condition.
    seed_guidance: str = (
        'You are an artist painting "{prompt}" in {bands} stages, from the top of the canvas down. '
        "Stage {band} paints the {part}. Briefly plan what to paint in this stage so that it fits the whole picture."
    )
    seed_stage: str = "{prompt}, {part}"


TEMPLATE_FIELDS: dict[str, frozenset[str]] = {
    "system": frozenset(),
    "part_top": frozenset(), "part_middle": frozenset(), "part_bottom": frozenset(), "part_whole": frozenset(),
    "part_numbered": frozenset({"band", "bands"}),
    "think_first": frozenset({"prompt", "part", "band", "bands"}),
    "think_next": frozenset({"prompt", "part", "band", "bands", "thoughts"}),
    "reflect": frozenset({"prompt", "part", "band", "bands", "thought", "thoughts"}),
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
                  "thoughts": "a red cube", "guidance": "a red cube"}


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
    """An understanding prompt: BOS, the user turn (an image block first, when given), the assistant cue.

    The image block is begin-of-image, `image_tokens` placeholders (the vision features replace their
    embeddings) and end-of-image, as Janus lays an image out in a conversation.
    """
    before, after = USER_TURN.split("{text}")
    t = bundle.tokens
    ids = [t.bos, *bundle.encode(system + before)]
    if image_tokens:
        ids += [t.boi, *([t.image] * image_tokens), t.eoi, *bundle.encode("\n")]
    return ids + bundle.encode(question + after)
