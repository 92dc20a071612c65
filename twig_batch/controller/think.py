"""Think: one cache-free pass of the language model over the prompt's tail plus the visual memory.

The text is always the clean user prompt, tokenized by the model's own (processor) tokenizer: never
a chat-formatted, stage-suffixed or guidance-augmented variant of it.
"""
from __future__ import annotations

import torch


def clean_prompt_ids(bundle, prompt: str) -> list[int]:
    """Token ids of the user's prompt as typed (outer whitespace aside), without special tokens."""
    return bundle.encode(prompt.strip())


def think_ids(bundle, prompt: str, last_n: int) -> list[int]:
    return clean_prompt_ids(bundle, prompt)[-last_n:]


@torch.no_grad()
def prompt_vector(bundle, prompt: str) -> torch.Tensor:
    """p_vec [D]: the mean input embedding of the clean prompt (zeros for an empty prompt)."""
    ids = clean_prompt_ids(bundle, prompt)
    if not ids:
        return torch.zeros(bundle.model.config.text_config.hidden_size, dtype=bundle.dtype, device=bundle.device)
    return bundle.embed_text(torch.tensor(ids, device=bundle.device)).mean(dim=0)


@torch.no_grad()
def think_latent(bundle, text_embeds: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """text_embeds [T, D] (T may be 0), memory [M, D] -> z_vec [D], the mean final hidden state."""
    inputs = torch.cat([text_embeds, memory.to(text_embeds.dtype)], dim=0).unsqueeze(0)
    out = bundle.language_model(inputs_embeds=inputs, use_cache=False)
    return out.last_hidden_state[0].mean(dim=0)
