"""The preallocated, fixed-shape KV cache, and passes over it (`forward_static`).

The forward pass proper is `forward.py`'s; it reads the weights of transformers' Llama modules but
the cache and the attention mask are ours, so
every row keeps its own positions and validity (left padding, unused control-token slots) while all
rows write the same cache column. Shapes stay fixed from step to step, which lets the decode step
be captured once as a CUDA graph.

A pass may instead write each row at columns of its own (`columns`), already reserved below the
shared write column: the image engine puts an image's control tokens there (`fast.py`). Positions
travel with the keys (RoPE), so where a key sits in the cache changes nothing but the mask. Such a
pass may also run over some rows of the cache only (`rows`): what the controller injects into a few
images costs those images' tokens, not the whole batch's.
"""
from __future__ import annotations

import torch

from twig_batch.engine.forward import CacheTensors, forward_at
from twig_batch.engine.fp8_kv import FP8
from twig_batch.engine.fused import FastModel
from twig_batch.engine.kv_arena import KVArenas
from twig_batch.engine.transfer import to_device

# Attention reads the cache up to the next multiple of this: a graph per bucket, captured once per
# worker (graphs.py keeps them), against reading 16 columns too many on average.
ATTEND_BUCKET = 32
# Tokens one prefill pass takes at most (in slices of rows): its activations (the joined gate/up
# output alone is 44 kB per token at 7B) stay a few GB however many rows a call prefills.
PREFILL_CHUNK_TOKENS = 16384


class StaticKVCache:
    """k, v [layers, rows, kv_heads, max_len, head_dim] and valid [rows, max_len], borrowed from the
    engine's KV `arenas` when given and free (`kv_arena.py`: same addresses call after call, so CUDA
    graphs outlive the call), else allocated for this cache alone. `max_len` may exceed what was asked.

    With `fp8=True` k and v hold fp8 values and k_scale, v_scale [layers, rows, kv_heads, max_len]
    their float32 scales (`fp8_kv.py`); otherwise the scales are None and k, v have the model's dtype.
    """

    def __init__(self, lm, rows: int, max_len: int, fp8: bool = False, arenas: KVArenas | None = None):
        cfg = lm.config
        weight = lm.embed_tokens.weight
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        lead = (cfg.num_hidden_layers, rows, self.kv_heads)
        self._arenas = arenas  # the engine's, to borrow from (None: memory of its own)
        self._lenders = []  # the arenas whose buffers this cache uses
        values = self._borrow(weight.device, FP8 if fp8 else weight.dtype, lead, self.head_dim, max_len)
        self.k, self.v, self.valid, from_arena = values
        self.k_scale = self.v_scale = None
        if fp8:  # the scales come from an arena of their own dtype: bytes are never read as another type
            self.k_scale, self.v_scale, _, scales_from_arena = self._borrow(weight.device, torch.float32, lead, 1,
                                                                            max_len)
            width = min(self.k.shape[3], self.k_scale.shape[3])
            self.k, self.v, self.valid = self.k[:, :, :, :width], self.v[:, :, :, :width], self.valid[:, :width]
            self.k_scale, self.v_scale = self.k_scale[..., :width, 0], self.v_scale[..., :width, 0]
            from_arena = from_arena and scales_from_arena
        self.arena = from_arena  # every tensor lent by an arena: graphs over them may be kept
        self.max_len = self.k.shape[3]
        self.used = 0  # columns written so far (same for every row)

    def _borrow(self, device, dtype, lead: tuple[int, int, int], trailing: int, max_len: int):
        """(k, v, valid, lent by the arena?) for one dtype: the arena's views when it is free."""
        layers, rows, kv_heads = lead
        arena = None if self._arenas is None else self._arenas.for_dtype(dtype)
        lent = None if arena is None else arena.lend(self, layers, rows, kv_heads, trailing, max_len)
        if lent is not None:
            self._lenders.append(arena)
            return (*lent, True)
        shape = (*lead, max_len, trailing)
        return (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros((rows, max_len), dtype=torch.bool, device=device), False)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every row not in `rows` (in that order): a smaller batch reads a smaller cache.

        The kept rows move to the front of the cache's own memory a layer at a time, so compacting
        never needs a second copy of the cache (at 7B that copy was over 20 GB beside a full arena).
        The cache keeps its hold on the arena, but graphs over its one-off shape are not kept."""
        kept, used = len(rows), self.used
        for values in (self.k, self.v, self.k_scale, self.v_scale):
            for layer in () if values is None else values:  # [rows, kv_heads, width(, head_dim)]
                layer[:kept, :, :used] = layer[rows, :, :used]
        self.valid[:kept] = self.valid[rows]
        self.k, self.v, self.valid = self.k[:, :kept], self.v[:, :kept], self.valid[:kept]
        if self.k_scale is not None:
            self.k_scale, self.v_scale = self.k_scale[:, :kept], self.v_scale[:, :kept]
        self.arena = False

    def __enter__(self) -> "StaticKVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """The call is over: the arena may lend its buffer again, and this cache cannot be used."""
        self._give_back()
        self.k = self.v = self.valid = self.k_scale = self.v_scale = None

    def _give_back(self) -> None:
        for arena in self._lenders:
            arena.give_back(self)
        self._lenders = []
        self.arena = False

    def tensors(self) -> "CacheTensors":
        return CacheTensors(self.k, self.v, self.valid, self.heads, self.kv_heads, self.head_dim, self.k_scale,
                            self.v_scale)


def forward_static(model: FastModel, cache: StaticKVCache, embeds: torch.Tensor, positions: torch.Tensor,
                   valid: torch.Tensor, first_rows: bool = False, columns: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None, columns_end: int | None = None) -> torch.Tensor:
    """Run `embeds` [R, T, D] at per-row `positions` [R, T] through `model` (the engine's
    `FastModel`, or `FastModel.plain(lm)`), writing cache columns used..used+T.

    `valid` [R, T] says which new columns other tokens may attend to (False: padding, or control
    tokens of a row that was not injected). Returns the final-norm hidden states [R, T, D].
    With `first_rows`, `embeds` are for the cache's first R rows only (the others are left alone).

    With `columns` [R, T] (device tensor) each row writes its own columns instead, and `used` stays
    where it is. A new token sees the valid columns below `used` that this pass does not write, the
    valid ones it writes for earlier tokens of its row, and its own. Invalid tokens may share a column
    (a scratch column, e.g. `used`, that a later pass overwrites); valid ones must not.

    With `rows` (a device tensor of cache row indices, one per input row; needs `columns`) the pass
    reads and writes those rows of the cache only; the others are left alone. `columns_end`: one past
    the largest of `columns`, where the caller knows it (found on the device, it waits for everything
    queued there).
    """
    length = embeds.shape[1]
    if columns is not None and columns_end is None:
        columns_end = int(columns.max()) + 1
    end = cache.used + length if columns is None else max(cache.used, columns_end)
    if end > cache.max_len:
        raise RuntimeError(f"KV cache full: {end} > {cache.max_len} columns")
    start = to_device([cache.used], torch.long, embeds.device)[0]
    attend = attend_width(cache, end)
    tensors = cache.tensors()
    if rows is not None:
        if columns is None:
            raise ValueError("a pass over some rows of the cache writes columns of its own (`columns`)")
        return forward_at(model, tensors, embeds, positions, valid, start, attend, columns, row_index=rows)
    rows = embeds.shape[0]
    if rows != cache.k.shape[1] and not first_rows:
        raise ValueError(f"{rows} rows of input for a cache of {cache.k.shape[1]}")
    chunk = max(1, PREFILL_CHUNK_TOKENS // length)
    if rows <= chunk:  # every decode step, and small prefills: one pass, no copy of the output
        hidden = forward_at(model, tensors.rows(0, rows), embeds, positions, valid, start, attend, columns)
    else:  # rows never see each other: a prefill in slices of rows bounds its activations
        hidden = torch.cat([forward_at(model, tensors.rows(a, min(a + chunk, rows)), embeds[a:a + chunk],
                                       positions[a:a + chunk], valid[a:a + chunk], start, attend,
                                       None if columns is None else columns[a:a + chunk])
                            for a in range(0, rows, chunk)])
    if columns is None:
        cache.used = end
    return hidden


def attend_width(cache: StaticKVCache, end: int) -> int:
    """The columns a pass that ends at column `end` reads (its attention bucket)."""
    return bucket_width(end, cache.max_len)


def bucket_width(end: int, max_len: int) -> int:
    return min(max_len, -(-end // ATTEND_BUCKET) * ATTEND_BUCKET)
