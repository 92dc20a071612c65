"""`Engine`: one worker's fast engine, the only owner of its device state.

Built once per worker from (bundle, KV cache kind, deterministic). Who owns what:

- the model as the fast forward runs it: one `fused.FastModel` (`model`), built here, holding the
  language model, its joined projections (on a GPU) and its own registry of compiled kernels, which
  `warm_up.py` compiles now, not in the first call. Every pass of the engine gets it handed down
  (fast.py, fast_text.py, graphs.py, sampling, and a controller built with `model=engine.model`);
  nothing is marked on the model and no registry lives in a module;
- the KV arenas its caches borrow (`kv_arena.KVArenas`) and the CUDA graph sets kept over them
  (`graphs.KeptGraphs`); nothing else holds either.

`reserve` is its sizing step: given what one image takes in a call (`memory.CallShape`, which the
pipeline counts per mode) and the row budget (images per call), the model-dtype arena is allocated
once, so later calls reuse its addresses and the graphs captured over them, and on a GPU the image
decode step's graphs for that many images are captured over it at once, one per attention bucket an
image call of that shape may walk (`graphs.decode_buckets` over the image row's columns): a worker's
first call replays. Graphs of other row counts (a smaller last part, a redraw of some images) and
every text call's graphs (a text call's row count is known only when it runs: prompts per call, rows
that fit, rows dropped when they finish) are captured the first time a step lands in them, and kept.
Images in an fp8 cache borrow arenas of their own dtypes, which `reserve` does not size: their graphs
too are captured on first use.

Two calls run: `draw_image_tokens` (`fast.py`, CFG row pairs: `inputs.py`) and `write_texts`
(`fast_text.py`). As in nano-vllm's split, the pipeline decides what to draw and write and in which
batches; the engine only runs it. A worker whose settings run the mixed loop instead
(`GenerationSettings.runs_mixed`) takes the engine's one loop (`mixed_loop`): its page pool, sized from
the free memory, and its graphs live as long as the worker, like the arena and graphs above.
"""
from __future__ import annotations

import torch

from twig_batch.engine.fast import draw_image_tokens_fast
from twig_batch.engine.fast_text import generate_text_fast
from twig_batch.engine.fused import FastModel
from twig_batch.engine.graphs import KeptGraphs, decode_buckets
from twig_batch.engine.hooks import ImageTokenObserver
from twig_batch.engine.inputs import TextPrompt
from twig_batch.engine.kv_arena import KVArenas
from twig_batch.engine.memory import CallShape, arena_bytes, free_device_bytes
from twig_batch.engine.mixed.loop import MixedLoop
from twig_batch.engine.mixed.sizing import mixed_loop
from twig_batch.engine.repeatable import attention_for
from twig_batch.engine.static_decoder import StaticKVCache
from twig_batch.engine.warm_up import warm_up

KV_CACHE_KINDS = ("model", "fp8")


class Engine:
    """Draws image tokens and writes texts for one bundle on its device."""

    def __init__(self, bundle, kv_cache: str = "model", deterministic: bool = False,
                 use_graphs: bool | None = None, fused: bool | None = None) -> None:
        """`fused`: joined projections and compiled kernels (True), compiled kernels only (False), or
        as the device wants (None: `FastModel.for_device`; a CPU runs the model as written)."""
        if kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got {kv_cache!r}")
        self.bundle, self.kv_cache, self.deterministic = bundle, kv_cache, deterministic
        self.use_graphs = bundle.device.type == "cuda" if use_graphs is None else use_graphs
        self.graphs = KeptGraphs()
        # Before an arena drops its buffer, the graphs over it go (they would write to freed memory).
        self.arenas = KVArenas(bundle.device, on_release=self.graphs.forget)
        lm = bundle.language_model
        self.model = FastModel.for_device(lm) if fused is None else FastModel.compiled(lm, join=fused)
        self._mixed: MixedLoop | None = None  # built on first use (`mixed_loop`)
        warm_up(bundle, self.model)  # kernels compile now, not during the first call (a no-op off a GPU)

    @classmethod
    def for_settings(cls, bundle, settings) -> "Engine":
        """The engine `settings` ask for: their KV cache kind and their choice of repeatable kernels."""
        return cls(bundle, kv_cache=settings.kv_cache, deterministic=settings.deterministic)

    def free_bytes(self) -> int | None:
        """Free device memory for the next call (its idle arenas included); None off a GPU."""
        return free_device_bytes(self.bundle.device, self.arenas)

    def reserve(self, shape: CallShape, images: int, call_images: int | None = None) -> None:
        """Size the model-dtype KV arena once for calls of up to `images` images of `shape`: it then
        never grows, and the graphs kept over it live as long as the worker. With graphs, the image
        decode step's for calls of `call_images` images (None: `images`) are captured now over that
        arena, one per bucket `image_buckets` lists; those already captured are kept as they are."""
        wanted = arena_bytes(self.bundle.language_model, shape, images, self.free_bytes())
        self.arenas.for_dtype(self.bundle.dtype).reserve(wanted)
        if self.use_graphs and not shape.fp8:
            self._capture_image_steps(shape, images if call_images is None else call_images)

    def image_buckets(self, shape: CallShape, max_len: int) -> list[int]:
        """The attention buckets an image call of `shape` may walk in a cache `max_len` wide: every
        bucket up to the image row's columns (its prompt, texts, control slots and image tokens)."""
        return decode_buckets(0, shape.image_row, max_len)

    @torch.no_grad()
    def _capture_image_steps(self, shape: CallShape, images: int) -> None:
        """The graph set a call of `images` images will look up (same arena views, same kernels
        allowed), with a graph per bucket of `image_buckets`."""
        with attention_for(self.deterministic), StaticKVCache(self.bundle.language_model, 2 * images, 1,
                                                              arenas=self.arenas) as cache:
            graphs = self.graphs.graph_set(self.model, cache, self.bundle.embed_image_codes, "image")
            if cache.arena:  # else the arena was lent (never at a worker's sizing step): nothing to keep
                for attend in self.image_buckets(shape, cache.max_len):
                    graphs.capture(attend)

    def mixed_loop(self) -> MixedLoop:
        """The mixed loop every call of this worker runs in (`pipeline/mixed.py`), over this model.
        Built on first use, over as many KV pages as the free memory then holds (idle arenas and the
        graphs over them go first: a worker runs one kind of call), and kept, with its graphs, for
        every later call."""
        if self._mixed is None:
            self.release()
            if self.bundle.device.type == "cuda":
                torch.cuda.empty_cache()  # the arenas' blocks, back to the device before the pool is sized
            self._mixed = mixed_loop(self.bundle, self.model)
        return self._mixed

    def release(self) -> None:
        """Every kept graph, idle arena and the mixed loop's pages go (after an out-of-memory error:
        start from an empty device)."""
        self._mixed = None
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
                                          arenas=self.arenas, kept=self.graphs, model=self.model)

    @torch.no_grad()
    def write_texts(self, prompts: list[TextPrompt], max_new_tokens: int, temperature: float = 0.0,
                    stop_id: int | None = None, max_rows: int | None = None) -> list[list[int]]:
        """New token ids per prompt, the stop token not included (`fast_text.generate_text_fast`)."""
        with attention_for(self.deterministic):
            return generate_text_fast(self.bundle, prompts, max_new_tokens, temperature, stop_id,
                                      use_graphs=self.use_graphs, max_rows=max_rows, arenas=self.arenas,
                                      kept=self.graphs, model=self.model)
