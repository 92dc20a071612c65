"""Build the decode step's kernels when a worker starts, not in its first batch.

On a GPU the element-wise helpers of the engine's `fused.FastModel` (its `kernels`, which it owns)
are Triton kernels built on first use, once per specialisation Triton makes (a prefill and a
one-token step, one row and several). The engine (`runner.py`) calls `warm_up` once, with its
model, when it is built: a few throw-away passes over a small cache of its own go through each,
so the building is part of the worker's start (and said with it), and its first batch draws at
once. Triton keeps what it built on disk, so a second worker on the same machine, or the next run,
loads it in milliseconds. The CUDA graphs are not captured here but at the engine's sizing step
(`Engine.reserve`), once the call size is known.
"""
from __future__ import annotations

import torch

from twig_batch.engine.fused import FastModel
from twig_batch.engine.static_decoder import StaticKVCache, forward_static

WARM_PROMPT_TOKENS = 8


@torch.no_grad()
def warm_up(bundle, model: FastModel) -> None:
    """Run each shape class of `model`'s forward pass once (a no-op off a GPU, where nothing is compiled)."""
    if bundle.device.type != "cuda":
        return
    lm = model.lm
    dim = lm.config.hidden_size
    for rows in (1, 2):
        embeds = torch.zeros(rows, WARM_PROMPT_TOKENS, dim, dtype=bundle.dtype, device=bundle.device)
        positions = torch.arange(WARM_PROMPT_TOKENS, device=bundle.device).expand(rows, -1)
        valid = torch.ones(rows, WARM_PROMPT_TOKENS, dtype=torch.bool, device=bundle.device)
        with StaticKVCache(lm, rows, WARM_PROMPT_TOKENS + 1) as cache:
            forward_static(model, cache, embeds, positions, valid)  # a prefill
            forward_static(model, cache, embeds[:, :1], positions[:, -1:] + 1, valid[:, :1])  # a decode step
    torch.cuda.synchronize(bundle.device)
