"""Checks of one prompt's text, run on the model actor before any drawing.

A prompt that cannot be drawn is that row's problem, never the batch's: each check returns the
reason for the row's manifest entry, or None. These need nothing; the length check needs the
actor's tokenizer and model and the sequences each mode builds, so it is the pipeline's
(`pipeline/sequences.py`, `PromptBudget`).
"""
from __future__ import annotations

import unicodedata

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
