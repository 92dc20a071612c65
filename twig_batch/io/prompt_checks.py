"""Checks of one prompt, run on the model actor before any drawing.

A prompt that cannot be drawn is that row's problem, never the batch's: each check returns the
reason for the row's manifest entry, or None. The text checks need nothing; the length check needs
the actor's tokenizer and model, because only they know how many tokens a prompt takes and how
long a sequence the model can hold.
"""
from __future__ import annotations

import string
import unicodedata

from twig_batch.prompts import DEFAULT_TEMPLATES, USER_TURN, Templates, chat_ids

# Tab, newline and carriage return are ordinary whitespace in text taken from files and forms.
_KEPT_CONTROLS = frozenset("\t\n\r")
_CONTROL_NAMES = {0x00: "NUL", 0x07: "BEL", 0x08: "BACKSPACE", 0x0B: "VERTICAL TAB", 0x0C: "FORM FEED",
                  0x1B: "ESC", 0x7F: "DEL"}


def text_problem(prompt) -> str | None:
    """Null, non-text, empty or blank prompts, and control characters (NUL and the like)."""
    if prompt is None:
        return "prompt is missing (null)"
    if not isinstance(prompt, str):
        return f"prompt is not text ({type(prompt).__name__})"
    if not prompt.strip():
        return "prompt is empty" if not prompt else "prompt is empty (only whitespace)"
    for position, char in enumerate(prompt):
        # Category Cc: C0 controls, DEL and C1 controls; they are invisible, and NUL ends C strings.
        if char not in _KEPT_CONTROLS and unicodedata.category(char) == "Cc":
            return (f"prompt holds the control character {describe_char(char)} at position {position} (counting "
                    "from 0); remove it (tab and newline are fine)")
    return None


def describe_char(char: str) -> str:
    code = ord(char)
    name = _CONTROL_NAMES.get(code)
    return f"U+{code:04X}" + (f" ({name})" if name else "")


def _prompt_uses(template: str) -> int:
    """How many times a template repeats the prompt (each copy costs the prompt's tokens once more)."""
    return sum(1 for _, name, _, _ in string.Formatter().parse(template) if name == "prompt")


class PromptBudget:
    """The most tokens a prompt may take for this model, mode and settings.

    The longest sequence a mode builds around a prompt must fit the language model's context
    (its `max_position_embeddings`): plain mode draws the image tokens after the prompt; twig mode
    also asks questions that repeat the prompt with every thought so far and a picture; seed mode
    conditions each stage on the prompt and its stage plan. Texts the model writes count at their
    token budget (think_max_tokens, guidance_max_tokens), control tokens at the controller's
    budget, so the limit holds whatever the model ends up writing.
    """

    def __init__(self, bundle, settings, templates: Templates | None = None):
        self.bundle = bundle
        self.context = int(bundle.model.config.text_config.max_position_embeddings)
        templates = templates or DEFAULT_TEMPLATES
        # Each entry: (tokens besides the prompt's, copies of the prompt) for one sequence the mode builds.
        self.sequences = _sequences(bundle, settings, templates)
        self.limit = max(0, min((self.context - fixed) // max(uses, 1) for fixed, uses in self.sequences))

    def count(self, prompt: str) -> int:
        return len(self.bundle.encode(prompt))

    def problem(self, prompt: str) -> str | None:
        tokens = self.count(prompt)
        if tokens <= self.limit:
            return None
        return (f"prompt is too long: {tokens} tokens, the limit is {self.limit} (the model holds "
                f"{self.context} tokens, which must also fit the image's {self.bundle.image_tokens} tokens and "
                "the mode's texts)")


def _sequences(bundle, settings, templates: Templates) -> list[tuple[int, int]]:
    from twig_batch.pipeline.bands import band_part

    image = bundle.image_tokens
    control = 0
    if settings.controller is not None:
        control = settings.controller.max_injections_per_band * settings.controller.control_tokens
    bands = settings.bands
    # Parts and band numbers change a few tokens only; the last band's are as long as any.
    fields = {"prompt": "", "part": band_part(templates, bands - 1, bands), "band": bands, "bands": bands}

    def draw(condition: str, **texts: int) -> tuple[int, int]:
        """BOS, the user turn, begin-of-image, then the image and control tokens."""
        text = condition.format(**fields, **{name: "" for name in texts})
        fixed = 2 + len(bundle.encode(USER_TURN.format(text=text))) + sum(texts.values()) + image + control
        return fixed, _prompt_uses(condition)

    def ask(template: str, written: int, picture: bool, **texts: int) -> tuple[int, int]:
        """An understanding prompt (with the picture so far, when shown) and the answer's token budget."""
        question = template.format(**fields, **{name: "" for name in texts})
        shown = bundle.understanding_tokens if picture else 0
        system = templates.system_for(picture=picture)
        fixed = len(chat_ids(bundle, question, system, image_tokens=shown)) + sum(texts.values()) + written
        return fixed, _prompt_uses(template)

    if settings.mode == "plain":
        return [draw("{prompt}")]
    if settings.mode == "seed":
        plan = settings.guidance_max_tokens
        return [ask(templates.seed_guidance, plan, False), draw(templates.seed_stage, guidance=plan)]
    thought = settings.think_max_tokens  # twig: thoughts and reflections are written within this budget
    sequences = [ask(templates.think_first, thought, False),
                 draw(templates.twig_condition, thoughts=bands * thought)]
    if bands > 1:
        sequences.append(ask(templates.think_next, thought, True, thoughts=(bands - 1) * thought))
    if settings.reflect:
        sequences.append(ask(templates.reflect, thought, True, thought=thought, thoughts=bands * thought,
                             earlier=(bands - 1) * thought))
    return sequences
