"""The sequences each mode builds around a prompt, counted once for memory and for the context.

Every mode draws image tokens after a text condition, and twig and seed also ask the model for
texts. Two questions read the same count: how many cache columns one image takes in a call (the
part size a worker plans, `call_shape`), and how long a prompt may be before the longest sequence
outgrows the model's context (`PromptBudget`). Written texts count at their token budgets
(think_max_tokens, guidance_max_tokens), control tokens at the controller's, so both answers hold
whatever the model ends up writing.

- plain: the prompt, then the image tokens (and control tokens), on two CFG rows;
- twig: the prompt and every thought so far, then the image; its questions (the first thought, the
  next thought over the canvas, the reflection) repeat the prompt and the thoughts;
- seed: the prompt and one stage plan, then the image; each stage's plan is asked without a picture.
"""
from __future__ import annotations

import string

from twig_batch.engine.memory import HEADROOM, CallShape, image_bytes, images_that_fit
from twig_batch.pipeline.bands import band_part
from twig_batch.prompts import DEFAULT_TEMPLATES, USER_TURN, Templates, chat_ids
from twig_batch.settings import GenerationSettings

PROMPT_TOKENS = 128  # a generous prompt length (Janus-Pro's chat template included) when none is given
TEMPLATE_TOKENS = 96  # the understanding templates' own words around the prompt (memory planning)


def control_tokens(settings: GenerationSettings) -> int:
    """Control-token columns one image may take in one drawing call."""
    if settings.controller is None:
        return 0
    return settings.controller.max_injections_per_band * settings.controller.control_tokens


def condition_text_tokens(settings: GenerationSettings) -> int:
    """Written text a band's condition holds at most: twig every thought, seed one stage plan."""
    return {"plain": 0, "twig": settings.bands * settings.think_max_tokens,
            "seed": settings.guidance_max_tokens}[settings.mode]


def call_shape(bundle, settings: GenerationSettings, prompt_tokens: int = PROMPT_TOKENS) -> CallShape:
    """Cache columns one image needs in an image call (its CFG rows and think row) and in a text call
    (twig: a reflection and the next thought, two rows each showing the canvas; seed: a row per stage),
    for prompts of `prompt_tokens` tokens."""
    think = 0
    if settings.controller is not None:  # one row, beside the call
        think = settings.controller.think_tokens + settings.controller.memory_tokens
    image_row = prompt_tokens + condition_text_tokens(settings) + bundle.image_tokens + control_tokens(settings)
    image_call = 2 * image_row + think
    text_call = 0
    if settings.mode == "twig":
        text_call = 2 * (bundle.understanding_tokens + prompt_tokens + TEMPLATE_TOKENS
                         + settings.bands * settings.think_max_tokens + settings.think_max_tokens)
    elif settings.mode == "seed":
        text_call = settings.bands * (prompt_tokens + TEMPLATE_TOKENS + settings.guidance_max_tokens)
    # Plain mode prefills the prompts only; the staged modes re-prefill drawn bands and read images.
    prefill = 2 * prompt_tokens if settings.mode == "plain" else max(image_call, text_call)
    return CallShape(image_call, text_call, prefill, fp8=settings.kv_cache == "fp8", image_row=image_row)


def bytes_per_image(bundle, settings: GenerationSettings, prompt_tokens: int = PROMPT_TOKENS) -> int:
    """What one more image adds to a call (`memory.image_bytes` of its `call_shape`)."""
    return image_bytes(bundle.language_model, call_shape(bundle, settings, prompt_tokens))


def images_per_call(bundle, settings: GenerationSettings, free_bytes: int, prompt_tokens: int = PROMPT_TOKENS,
                    headroom: float = HEADROOM) -> int:
    """The most images one call can draw within `free_bytes` (`memory.images_that_fit`)."""
    return images_that_fit(bundle.language_model, call_shape(bundle, settings, prompt_tokens), free_bytes, headroom)


def _prompt_uses(template: str) -> int:
    """How many times a template repeats the prompt (each copy costs the prompt's tokens once more)."""
    return sum(1 for _, name, _, _ in string.Formatter().parse(template) if name == "prompt")


class PromptBudget:
    """The most tokens a prompt may take for this model, mode and settings.

    The longest sequence a mode builds around a prompt must fit the language model's context
    (its `max_position_embeddings`).
    """

    def __init__(self, bundle, settings: GenerationSettings, templates: Templates | None = None):
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


def _sequences(bundle, settings: GenerationSettings, templates: Templates) -> list[tuple[int, int]]:
    image = bundle.image_tokens
    control = control_tokens(settings)
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
        return [ask(templates.seed_guidance, plan, False),
                draw(templates.seed_stage, guidance=condition_text_tokens(settings))]
    thought = settings.think_max_tokens  # twig: thoughts and reflections are written within this budget
    sequences = [ask(templates.think_first, thought, False),
                 draw(templates.twig_condition, thoughts=condition_text_tokens(settings))]
    if bands > 1:
        sequences.append(ask(templates.think_next, thought, True, thoughts=(bands - 1) * thought))
    if settings.reflect:
        sequences.append(ask(templates.reflect, thought, True, thought=thought, thoughts=bands * thought,
                             earlier=(bands - 1) * thought))
    return sequences
