"""Texts for thoughts, reflections and guidance as strings: the engine writes token ids, this cleans them.

The engine's batched text writer left-pads prompts, masks the padding and counts positions over real
tokens only, and a row stops as soon as it writes the stop token or reaches its token budget: the
call's limit, or the prompt's own `stop_after` when smaller (`text_lengths.py`'s emulation of
realistic lengths). Sampled text draws its noise from the row's own seed and the token's index, so
a row writes exactly what it would write alone (the reference loops are `reference/texts.py`).
"""
from __future__ import annotations

from twig_batch.engine.fast_text import generate_text_fast
from twig_batch.engine.inputs import TextPrompt


def clean_text(bundle, ids: list[int]) -> str:
    """The decoded text (special tokens dropped), trimmed at both ends."""
    return bundle.decode(ids).strip()


class BatchedText:
    """Writes the texts of many prompts in one batched call of `engine.write_texts` (`engine/runner.py`;
    without an engine, the static-cache writer with caches of the call's own)."""

    def __init__(self, engine=None) -> None:
        self.engine = engine

    def __call__(self, bundle, prompts: list[TextPrompt], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        if self.engine is not None:
            written = self.engine.write_texts(prompts, max_new_tokens, temperature)
        else:
            written = generate_text_fast(bundle, prompts, max_new_tokens, temperature)
        return [clean_text(bundle, ids) for ids in written]
