"""Think: one cache-free pass of the language model over the prompt's tail plus the visual memory.

The text is always the clean user prompt, tokenized by the model's own (processor) tokenizer: never
a chat-formatted, stage-suffixed or guidance-augmented variant of it.

`think_latents` is the definition, written plainly (one pass over text and memory); the controller
runs `ThinkContext`, which computes the same with the texts' part done once per band.
"""
from __future__ import annotations

import torch

from twig_batch.engine.fused import FastModel
from twig_batch.engine.static_decoder import StaticKVCache, forward_static
from twig_batch.engine.transfer import to_device


def clean_prompt_ids(bundle, prompt: str) -> list[int]:
    """Token ids of the user's prompt as typed (outer whitespace aside), without special tokens."""
    return bundle.encode(prompt.strip())


def think_ids(bundle, prompt: str, last_n: int) -> list[int]:
    """The think text: the clean prompt as the design notes encode it, with the tokenizer's default
    special tokens (DeepSeek's tokenizer puts BOS first), then its last `last_n` tokens; so BOS leads
    only a prompt that fits. p_vec (`prompt_vector`) pools the prompt's own tokens, without BOS."""
    return [bundle.tokens.bos, *clean_prompt_ids(bundle, prompt)][-last_n:]


@torch.no_grad()
def prompt_vector(bundle, prompt: str) -> torch.Tensor:
    """p_vec [D]: the mean input embedding of the clean prompt (zeros for an empty prompt)."""
    ids = clean_prompt_ids(bundle, prompt)
    if not ids:
        return torch.zeros(bundle.model.config.text_config.hidden_size, dtype=bundle.dtype, device=bundle.device)
    return bundle.embed_text(to_device(ids, torch.long, bundle.device)).mean(dim=0)


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


class ThinkContext:
    """The think texts of a band's images, run through the model once; each think then runs only its
    M memory tokens over them.

    A think is one causal pass over text then memory, so the text part (its cache entries and final
    hidden states) is the same at every think of a band: computing it once turns a pass over
    T + M tokens per injection into one over M. `latents` equals `think_latents` on the same inputs
    (up to float rounding). Its passes run `model` (the engine's `FastModel`; None: the model as written).
    """

    def __init__(self, bundle, texts: list[torch.Tensor], memory_tokens: int, model: FastModel | None = None):
        lm = bundle.language_model
        self.model = model or FastModel.plain(lm)
        n, d = len(texts), bundle.model.config.text_config.hidden_size
        self.bundle, self.memory_tokens = bundle, memory_tokens
        lengths = [t.shape[0] for t in texts]
        self.lengths = to_device(lengths, torch.long, bundle.device)
        width = max(lengths, default=0)
        self.cache = StaticKVCache(lm, n, width + memory_tokens)
        # Sums in at least float32: a bf16 sum of a long text would round away its later tokens.
        self.sum_dtype = torch.promote_types(bundle.dtype, torch.float32)
        self.text_sum = torch.zeros(n, d, dtype=self.sum_dtype, device=bundle.device)
        if width:
            inputs = torch.zeros(n, width, d, dtype=bundle.dtype, device=bundle.device)
            for row, text in enumerate(texts):  # left-padded: positions count each row's own tokens
                inputs[row, width - text.shape[0]:] = text.to(inputs.dtype)
            valid = torch.arange(width, device=bundle.device) >= (width - self.lengths).unsqueeze(1)
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
            hidden = forward_static(self.model, self.cache, inputs, positions, valid)
            self.text_sum = (hidden.to(self.sum_dtype) * valid.unsqueeze(-1)).sum(1)
        self.width = width

    def latents(self, rows: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """z_vec [len(rows), D] for the images at `rows` of this context, memory [len(rows), M, D].

        Only those images' rows run: each writes its memory after its own text (the columns a later
        think of the same image overwrites)."""
        m = self.memory_tokens
        rows = rows.to(self.lengths.device)
        lengths = self.lengths[rows]
        inputs = memory.to(self.bundle.dtype)
        columns = (self.width + torch.arange(m, device=rows.device)).expand(len(rows), m)
        positions = lengths.unsqueeze(1) + torch.arange(m, device=rows.device)
        valid = torch.ones((len(rows), m), dtype=torch.bool, device=rows.device)
        self.cache.used = self.width
        hidden = forward_static(self.model, self.cache, inputs, positions, valid, columns=columns,
                                rows=rows, columns_end=self.width + m)
        z = (self.text_sum[rows] + hidden.to(self.sum_dtype).sum(1)) / (lengths + m).unsqueeze(1)
        return z.to(hidden.dtype)
