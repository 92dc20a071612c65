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
def think_latents(bundle, texts: list[torch.Tensor], memory: torch.Tensor) -> torch.Tensor:
    """z_vec per image [n, D]: the mean final hidden state of one cache-free pass over its text [T_i, D]
    (T_i may be 0) then its memory [M, D]; memory is [n, M, D], and the n passes run as one batch.

    Each row is its text then its memory, right-padded to the longest: attention is causal, so no
    real token sees the padding, and the mean is taken over each row's own tokens only.
    """
    n, m, d = memory.shape
    lengths = [t.shape[0] + m for t in texts]
    inputs = memory.new_zeros(n, max(lengths), d, dtype=texts[0].dtype if texts else memory.dtype)
    for row, text in enumerate(texts):
        inputs[row, : lengths[row]] = torch.cat([text, memory[row].to(text.dtype)], dim=0)
    hidden = bundle.language_model(inputs_embeds=inputs, use_cache=False).last_hidden_state
    real = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0) < torch.tensor(
        lengths, device=inputs.device).unsqueeze(1)
    return (hidden * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True).to(hidden.dtype)
