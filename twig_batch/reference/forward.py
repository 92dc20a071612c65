"""The reference tier's one forward pass: transformers' own model over its own dynamic cache.

transformers 5.24 renamed the cache argument of its decoders' forward from `past_key_values` to
`cache` and marks the old name for removal in 5.40; the earlier releases this project allows know
only the old name. `cached_forward` passes the cache under the name the model's forward declares, so
the same call runs on every allowed release, without the deprecation warning on the newer ones.
"""
from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache


@functools.cache
def cache_argument(model_class: type) -> str:
    """`cache` where `model_class.forward` declares it, else the older `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def new_cache(lm) -> DynamicCache:
    return DynamicCache(config=lm.config)


def cached_forward(lm, cache, **inputs):
    """`lm(**inputs)` reading and extending `cache` (a transformers `Cache`)."""
    return lm(**inputs, **{cache_argument(type(lm)): cache}, use_cache=True)


def last_hidden(lm, cache, **inputs) -> torch.Tensor:
    """The last position's final hidden state [R, D] of `cached_forward`."""
    return cached_forward(lm, cache, **inputs).last_hidden_state[:, -1]
