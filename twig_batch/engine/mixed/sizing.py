"""A mixed loop over as many KV pages as the free memory holds: `mixed_loop`, `pages_that_fit`."""
from __future__ import annotations

from twig_batch.engine.fused import FastModel
from twig_batch.engine.memory import HEADROOM, free_device_bytes, prefill_bytes_per_token
from twig_batch.engine.mixed.loop import MixedLoop
from twig_batch.engine.mixed.pages import PagePool

PAGE_SIZE = 16  # token slots per KV page
# Tokens one step feeds at most: every decoding row, then prefill chunks. For twig on an H200, 2,048
# held prefills back (35 % of steps full) and drew 2.82 images/s; 4,096 (11 % full) drew 3.05.
STEP_TOKENS = 4096
HOST_POOL_BYTES = 1 << 30  # the page pool off a GPU, where no free memory is measured


def mixed_loop(bundle, model: FastModel | None = None, pages: int | None = None, page_size: int = PAGE_SIZE,
               step_tokens: int = STEP_TOKENS, profile: bool = False, fixed_steps: bool | None = None) -> MixedLoop:
    """A loop over `pages` KV pages of `page_size` slots (None: as many as the free memory holds, or
    `HOST_POOL_BYTES` worth off a GPU), running `model` (an engine's joined projections and compiled
    kernels; None: the model as written); `fixed_steps` as `MixedLoop` takes it."""
    model = model or FastModel.plain(bundle.language_model)
    pool = PagePool(bundle.language_model, pages or pages_that_fit(bundle, page_size, step_tokens), page_size)
    return MixedLoop(bundle, pool, model, step_tokens, profile=profile, fixed_steps=fixed_steps)


def pages_that_fit(bundle, page_size: int, step_tokens: int) -> int:
    """The pages the free memory holds after a step's activations (a share kept back as headroom)."""
    lm = bundle.language_model
    free = free_device_bytes(bundle.device)
    budget = HOST_POOL_BYTES if free is None else int(free * HEADROOM) - step_tokens * prefill_bytes_per_token(lm)
    return max(1, budget // PagePool.bytes_per_page(lm, page_size, bundle.dtype))
