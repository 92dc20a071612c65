"""Every prompt the model sees, in one place.

Text-to-image follows Janus-Pro's chat format: a user turn, an empty assistant turn, then the
begin-of-image tag. The staged modes add their templates here too, and users may override any of
them from a JSON file (see `load_templates`).
"""
from __future__ import annotations

USER_TURN = "<|User|>: {text}\n\n<|Assistant|>:"


def t2i_prompt_ids(bundle, prompt: str) -> list[int]:
    """Token ids of the conditional row: BOS, the chat-formatted prompt, begin-of-image."""
    return [bundle.tokens.bos, *bundle.encode(USER_TURN.format(text=prompt)), bundle.tokens.boi]


def unconditional_ids(ids: list[int], pad_id: int) -> list[int]:
    """The CFG partner row: same length, every token but BOS (first) and begin-of-image (last) padded."""
    if len(ids) < 2:
        raise ValueError("a text-to-image prompt has at least BOS and begin-of-image")
    return [ids[0], *([pad_id] * (len(ids) - 2)), ids[-1]]
