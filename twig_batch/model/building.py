"""A Janus model allocated from its config, and where built models are cached.

Below loading and the built-in random models (tiny.py, random_full.py): all three build a model
the same way, and loading picks between them.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from twig_batch.model.bundle import SpecialTokens


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def janus_generation_config(config, tokens: SpecialTokens):
    """The generation config transformers' Janus conversion script (convert_janus_weights_to_hf.py)
    gives a checkpoint. Our engine never reads it; transformers' own image `generate` cannot run without it."""
    from transformers import GenerationConfig

    generation = GenerationConfig.from_model_config(config)  # bos, eos and pad of the text config
    # A config marked as derived from the model config drops its custom entries when read back from disk.
    generation._from_model_config = False
    generation.temperature = 1
    generation.guidance_scale = 5
    generation.pad_token_id = tokens.pad
    # generate(generation_mode="image") reads the begin-of-image id from generation_kwargs (5.17 and 5.24 both do);
    # some releases of the conversion script write it as a field of its own instead.
    generation.generation_kwargs = {"boi_token_id": tokens.boi}
    generation.boi_token_id = tokens.boi
    return generation


def build_model(config, tokens: SpecialTokens, device, dtype, init_weights: bool = False) -> torch.nn.Module:
    """Allocate a Janus model directly on `device` in `dtype` (random init only when asked), carrying the
    generation config of a converted checkpoint."""
    from transformers import JanusForConditionalGeneration

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x releases keep it in modeling_utils
        from transformers.modeling_utils import no_init_weights
    skip = contextlib.nullcontext() if init_weights else no_init_weights()
    with skip, _default_dtype(dtype), torch.device(device):
        model = JanusForConditionalGeneration(config)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.generation_config = janus_generation_config(config, tokens)
    return model


def default_cache_dir() -> Path:
    return Path(os.environ.get("TWIG_BATCH_CACHE", Path.home() / ".cache" / "twig-batch"))
