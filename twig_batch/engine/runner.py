"""`Engine`: one worker's fast engine, the only owner of its device state.

Built once per worker from (bundle, KV cache kind, deterministic), it fuses the model once, compiles
the decode step's kernels (`warm_up.py`), and owns the KV arenas its caches borrow (`kv_arena.py`)
and the CUDA graph sets kept over them (`graphs.py`); nothing else holds either. `reserve` is its
sizing step: given what one image takes in a call (`memory.CallShape`, which the pipeline counts
per mode) and the row budget (images per call), the model-dtype arena is allocated once, so later
calls reuse its addresses and the graphs captured over them. The graphs themselves are captured the
first time a call lands in a (row count, attention bucket) and replayed after.

Two calls run: `draw_image_tokens` (`fast.py`, CFG row pairs: `inputs.py`) and `write_texts`
(`fast_text.py`). As in nano-vllm's split, the pipeline decides what to draw and write and in which
batches; the engine only runs it.
"""
from __future__ import annotations

import torch

from twig_batch.engine.fast import draw_image_tokens_fast
from twig_batch.engine.fast_text import generate_text_fast
from twig_batch.engine.fused import fuse_for_device
from twig_batch.engine.graphs import KeptGraphs
from twig_batch.engine.hooks import ImageTokenObserver
from twig_batch.engine.inputs import TextPrompt
from twig_batch.engine.kv_arena import KVArenas
from twig_batch.engine.memory import CallShape, arena_bytes, free_device_bytes
from twig_batch.engine.repeatable import attention_for
from twig_batch.engine.warm_up import warm_up

KV_CACHE_KINDS = ("model", "fp8")


class Engine:
    """Draws image tokens and writes texts for one bundle on its device."""

    def __init__(self, bundle, kv_cache: str = "model", deterministic: bool = False,
                 use_graphs: bool | None = None) -> None:
        if kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got {kv_cache!r}")
        self.bundle, self.kv_cache, self.deterministic = bundle, kv_cache, deterministic
        self.use_graphs = bundle.device.type == "cuda" if use_graphs is None else use_graphs
        self.graphs = KeptGraphs()
        # Before an arena drops its buffer, the graphs over it go (they would write to freed memory).
        self.arenas = KVArenas(bundle.device, on_release=self.graphs.forget)
        fuse_for_device(bundle.language_model)
        warm_up(bundle)  # kernels compile now, not during the first call (a no-op off a GPU)

    @classmethod
    def for_settings(cls, bundle, settings) -> "Engine":
        """The engine `settings` ask for: their KV cache kind and their choice of repeatable kernels."""
        return cls(bundle, kv_cache=settings.kv_cache, deterministic=settings.deterministic)

    def free_bytes(self) -> int | None:
        """Free device memory for the next call (its idle arenas included); None off a GPU."""
        return free_device_bytes(self.bundle.device, self.arenas)

    def reserve(self, shape: CallShape, images: int) -> None:
        """Size the model-dtype KV arena once for calls of `images` images of `shape`: it then never
        grows, and the graphs kept over it live as long as the worker."""
        wanted = arena_bytes(self.bundle.language_model, shape, images, self.free_bytes())
        self.arenas.for_dtype(self.bundle.dtype).reserve(wanted)

    def release(self) -> None:
        """Every kept graph and idle arena goes (after an out-of-memory error: start from an empty device)."""
        self.graphs.forget()
        self.arenas.release()

    @torch.no_grad()
    def draw_image_tokens(self, cond_rows: list[list[int]], seeds: list[int], settings, n_tokens: int,
                          prefix_codes: torch.Tensor | None = None, first_step: int = 0,
                          observer: ImageTokenObserver | None = None) -> torch.Tensor:
        """Codes [B, n_tokens] for B images with conditional prompt ids `cond_rows` (each image is a
        CFG row pair); image b matches `reference_image_tokens(bundle, cond_rows[b], seeds[b], ...)`."""
        with attention_for(self.deterministic):
            return draw_image_tokens_fast(self.bundle, cond_rows, seeds, settings, n_tokens, prefix_codes, first_step,
                                          observer, use_graphs=self.use_graphs, fp8=self.kv_cache == "fp8",
                                          arenas=self.arenas, kept=self.graphs)

    @torch.no_grad()
    def write_texts(self, prompts: list[TextPrompt], max_new_tokens: int, temperature: float = 0.0,
                    stop_id: int | None = None, max_rows: int | None = None) -> list[list[int]]:
        """New token ids per prompt, the stop token not included (`fast_text.generate_text_fast`)."""
        with attention_for(self.deterministic):
            return generate_text_fast(self.bundle, prompts, max_new_tokens, temperature, stop_id,
                                      use_graphs=self.use_graphs, max_rows=max_rows, arenas=self.arenas,
                                      kept=self.graphs)
