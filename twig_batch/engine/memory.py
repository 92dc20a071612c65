"""How many images one model call can hold, from the device's free memory, in bytes.

A call's memory beyond the weights is almost all KV cache. How many columns one image takes in an
image call and in a text call depends on the mode, which the pipeline counts (`CallShape`, built by
`pipeline/sequences.py`); here columns become bytes. The larger of the two calls, plus the
prefill's transient activations, is what one more image costs. Only
part of the free memory is handed out: an out-of-memory error costs a whole batch, a few images
fewer per call a few percent of speed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from twig_batch.engine.kv_arena import KVArenas
from twig_batch.engine.static_decoder import PREFILL_CHUNK_TOKENS

HEADROOM = 0.8  # of the free memory; the rest absorbs fragmentation and the VQ decoder's activations
MAX_IMAGES_PER_CALL = 512


def kv_bytes_per_token(lm, fp8: bool = False) -> int:
    """Cache bytes per row per column: the model's dtype, or fp8 values plus a float32 scale per head."""
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_head = head_dim + 4 if fp8 else head_dim * lm.embed_tokens.weight.element_size()
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * per_head


def prefill_bytes_per_token(lm) -> int:
    """A prefill's activations per token: hidden states, q/k/v, the joined gate/up output."""
    cfg = lm.config
    return (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * lm.embed_tokens.weight.element_size()


@dataclass(frozen=True)
class CallShape:
    """What one image takes in a call, in cache columns (the pipeline counts them per mode:
    `pipeline/sequences.py`): its rows in an image call, its rows in a text call, and the tokens of
    the prefill's output it keeps; `fp8` when image calls keep an fp8 cache; `image_row`, the
    columns one CFG row of an image call fills at most (the attention buckets its steps walk)."""
    image_call: int
    text_call: int
    prefill_tokens: int
    fp8: bool = False
    image_row: int = 0

    def arena_columns(self) -> int:
        """Columns per image the model-dtype KV arena holds: text calls, and image calls unless fp8."""
        return max(0 if self.fp8 else self.image_call, self.text_call)


def image_bytes(lm, shape: CallShape) -> int:
    """What one more image adds to a call: its KV cache (the larger of its image and text calls) and
    its share of the prefill's output; `prefill_slice_bytes` is paid once per call on top."""
    image = shape.image_call * kv_bytes_per_token(lm, fp8=shape.fp8)
    text = shape.text_call * kv_bytes_per_token(lm)
    return max(image, text) + shape.prefill_tokens * prefill_output_bytes_per_token(lm)


def prefill_output_bytes_per_token(lm) -> int:
    """A prefill's output per token (its final hidden states), kept for every row of the call."""
    return lm.config.hidden_size * lm.embed_tokens.weight.element_size()


def prefill_slice_bytes(lm) -> int:
    """A prefill's other activations: one slice's (`PREFILL_CHUNK_TOKENS`), however many rows there are."""
    return PREFILL_CHUNK_TOKENS * prefill_bytes_per_token(lm)


def arena_bytes(lm, shape: CallShape, images: int, free_bytes: int | None) -> int:
    """The model-dtype KV arena for calls of `images` images, sized once so that it never grows (and
    the CUDA graphs kept over it live as long as the worker); never past the memory: a text call that
    cannot fit at once runs in rounds."""
    wanted = images * shape.arena_columns() * kv_bytes_per_token(lm)
    return wanted if free_bytes is None else min(wanted, int(free_bytes * HEADROOM))


def free_device_bytes(device: torch.device, arenas: KVArenas | None = None) -> int | None:
    """Free memory on a GPU, counting blocks PyTorch holds but does not use and the idle KV `arenas`
    of its engine (the next call's cache is carved from them); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + unused + (0 if arenas is None else arenas.idle_bytes())


def planning_budget(free_bytes: int, own_arena: int, other_arenas: int = 0, headroom: float = HEADROOM) -> int:
    """What one call may plan to use of `free_bytes` (as `free_device_bytes` counts it, every idle KV
    arena included). `own_arena` is the idle arena its cache will borrow: already allocated and set
    aside for caches, so it counts whole. Arenas of other dtypes (an fp8 cache's) stay allocated
    through the call, so they do not count; the headroom applies to the rest, where the call's other
    allocations land."""
    return own_arena + int((free_bytes - own_arena - other_arenas) * headroom)


def images_that_fit(lm, shape: CallShape, free_bytes: int, headroom: float = HEADROOM) -> int:
    """The most images one call can draw within `free_bytes` (at least 1, at most MAX_IMAGES_PER_CALL)."""
    budget = int(free_bytes * headroom) - prefill_slice_bytes(lm)
    fit = budget // image_bytes(lm, shape)
    return max(1, min(MAX_IMAGES_PER_CALL, fit))


def text_rows_that_fit(lm, budget: int, columns: int, prefill_tokens: int) -> int:
    """How many rows of one text call fit within `budget` bytes (`planning_budget`; at least 1): each
    row holds a KV cache `columns` wide and its `prefill_tokens` of the prefill's output, and the call
    one slice of the prefill's other activations."""
    per_row = columns * kv_bytes_per_token(lm) + prefill_tokens * prefill_output_bytes_per_token(lm)
    one_slice = prefill_slice_bytes(lm) if prefill_tokens else 0
    return max(1, (budget - one_slice) // per_row)
