"""How many images one model call can hold, from the device's free memory.

A call's memory beyond the weights is almost all KV cache: the image engine keeps two rows per
image (CFG) as long as prompt + stage text + image tokens + control-token slots; the text engine
keeps, per image, a reflection and the next thought over an understanding prompt (the partial
image's vision tokens, the earlier thoughts) in twig mode, or every stage's plan in seed mode. The
larger of the two, plus the prefill's transient activations, is what one more image costs. Only
part of the free memory is handed out: an out-of-memory error costs a whole batch, a few images
fewer per call a few percent of speed.
"""
from __future__ import annotations

import torch

from twig_batch.engine.kv_arena import arena_for, idle_arena_bytes
from twig_batch.engine.static_decoder import PREFILL_CHUNK_TOKENS
from twig_batch.settings import GenerationSettings

PROMPT_TOKENS = 128  # a generous prompt length (Janus-Pro's chat template included) when none is given
TEMPLATE_TOKENS = 96  # the understanding templates' own words around the prompt
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


def _columns(bundle, settings: GenerationSettings, prompt_tokens: int) -> tuple[int, int]:
    """Cache columns one image needs: in an image call (its CFG rows and think row), in a text call."""
    # twig draws band k from the prompt and every thought so far; seed from its stage text (a template
    # may hold the stage's plan).
    text_tokens = {"plain": 0, "twig": settings.bands * settings.think_max_tokens,
                   "seed": settings.guidance_max_tokens}[settings.mode]
    slots = think = 0
    if settings.controller is not None:
        slots = settings.controller.max_injections_per_band * settings.controller.control_tokens
        think = settings.controller.think_tokens + settings.controller.memory_tokens  # one row, beside the call
    image_call = 2 * (prompt_tokens + text_tokens + bundle.image_tokens + slots) + think
    text_call = 0
    if settings.mode == "twig":  # a reflection and the next thought in one call: two rows, each showing the canvas
        text_call = 2 * (bundle.understanding_tokens + prompt_tokens + TEMPLATE_TOKENS
                         + settings.bands * settings.think_max_tokens + settings.think_max_tokens)
    elif settings.mode == "seed":  # every stage's plan in one call: a row per stage, text only
        text_call = settings.bands * (prompt_tokens + TEMPLATE_TOKENS + settings.guidance_max_tokens)
    return image_call, text_call


def bytes_per_image(bundle, settings: GenerationSettings, prompt_tokens: int = PROMPT_TOKENS) -> int:
    """What one more image adds to a call: its KV cache (the larger of its image and text calls) and
    its share of the prefill's output; `prefill_slice_bytes` is paid once per call on top."""
    lm = bundle.language_model
    image_call, text_call = _columns(bundle, settings, prompt_tokens)
    # Plain mode prefills the prompts only; the staged modes re-prefill drawn bands and read images.
    prefill_tokens = 2 * prompt_tokens if settings.mode == "plain" else max(image_call, text_call)
    image_bytes = image_call * kv_bytes_per_token(lm, fp8=settings.kv_cache == "fp8")
    return max(image_bytes, text_call * kv_bytes_per_token(lm)) + prefill_tokens * prefill_output_bytes_per_token(lm)


def prefill_output_bytes_per_token(lm) -> int:
    """A prefill's output per token (its final hidden states), kept for every row of the call."""
    return lm.config.hidden_size * lm.embed_tokens.weight.element_size()


def prefill_slice_bytes(lm) -> int:
    """A prefill's other activations: one slice's (`PREFILL_CHUNK_TOKENS`), however many rows there are."""
    return PREFILL_CHUNK_TOKENS * prefill_bytes_per_token(lm)


def reserve_kv_arena(bundle, settings: GenerationSettings, images: int, prompt_tokens: int = PROMPT_TOKENS) -> None:
    """Size the model-dtype KV arena once for calls of `images` images (their text calls, and their
    image calls unless those keep an fp8 cache): it then never grows, and the CUDA graphs kept over
    it live as long as the worker."""
    image_call, text_call = _columns(bundle, settings, prompt_tokens)
    columns = max(0 if settings.kv_cache == "fp8" else image_call, text_call)
    wanted = images * columns * kv_bytes_per_token(bundle.language_model)
    free = free_device_bytes(bundle.device)
    if free is not None:  # a text call that cannot fit at once runs in rounds: never reserve past the memory
        wanted = min(wanted, int(free * HEADROOM))
    arena_for(bundle.device, bundle.dtype).reserve(wanted)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on a GPU, counting blocks PyTorch holds but does not use and the idle KV arena
    (the next call's cache is carved from it); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + unused + idle_arena_bytes(device)


def planning_budget(free_bytes: int, own_arena: int, other_arenas: int = 0, headroom: float = HEADROOM) -> int:
    """What one call may plan to use of `free_bytes` (as `free_device_bytes` counts it, every idle KV
    arena included). `own_arena` is the idle arena its cache will borrow: already allocated and set
    aside for caches, so it counts whole. Arenas of other dtypes (an fp8 cache's) stay allocated
    through the call, so they do not count; the headroom applies to the rest, where the call's other
    allocations land."""
    return own_arena + int((free_bytes - own_arena - other_arenas) * headroom)


def images_per_call(bundle, settings: GenerationSettings, free_bytes: int, prompt_tokens: int = PROMPT_TOKENS,
                    headroom: float = HEADROOM) -> int:
    """The most images one call can draw within `free_bytes` (at least 1, at most MAX_IMAGES_PER_CALL)."""
    budget = int(free_bytes * headroom) - prefill_slice_bytes(bundle.language_model)
    fit = budget // bytes_per_image(bundle, settings, prompt_tokens)
    return max(1, min(MAX_IMAGES_PER_CALL, fit))


def text_rows_that_fit(lm, budget: int, columns: int, prefill_tokens: int) -> int:
    """How many rows of one text call fit within `budget` bytes (`planning_budget`; at least 1): each
    row holds a KV cache `columns` wide and its `prefill_tokens` of the prefill's output, and the call
    one slice of the prefill's other activations."""
    per_row = columns * kv_bytes_per_token(lm) + prefill_tokens * prefill_output_bytes_per_token(lm)
    one_slice = prefill_slice_bytes(lm) if prefill_tokens else 0
    return max(1, (budget - one_slice) // per_row)
