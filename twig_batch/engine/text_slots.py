"""Handing a finished row of the static KV cache to a new prompt in the middle of a call.

Every row writes the same cache column each step, so a new prompt cannot start at column 0 of a
freed row. Its prompt goes instead into the columns just before the next one written, and every
other column of the row is marked invalid: from then on the row computes exactly what the prompt
would alone (its positions count its own tokens). The writes are in place, so CUDA graphs captured
over the cache keep replaying the right tensors.
"""
from __future__ import annotations

import torch

from twig_batch.engine.static_decoder import StaticKVCache


def place_rows(cache: StaticKVCache, slots: torch.Tensor, source: StaticKVCache) -> None:
    """Overwrite rows `slots` of `cache` with the rows of `source` (in that order): the columns
    `source` has written land in [cache.used - source.used, cache.used); every other column of
    those rows becomes invalid."""
    end = cache.used
    start = end - source.used
    if start < 0:
        raise ValueError(f"a {source.used}-column prompt does not fit before column {end}")
    cache.valid[slots] = False
    cache.valid[slots, start:end] = source.valid[:, :source.used]
    cache.k[:, slots, :, start:end] = source.k[:, :, :, :source.used]
    cache.v[:, slots, :, start:end] = source.v[:, :, :, :source.used]
