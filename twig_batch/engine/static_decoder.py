"""The language model's forward pass over a preallocated, fixed-shape KV cache.

Reads the weights of transformers' Llama modules but owns the cache and the attention mask, so
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

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from twig_batch.engine.fused import FUSED_ATTR, KERNELS, finish, fused_layer
from twig_batch.engine.fp8_kv import FP8, decode_attention, quantize, reference_attention
from twig_batch.engine.kv_arena import arena_for

# Attention reads the cache up to the next multiple of this: a graph per bucket, captured once per
# worker (graphs.py keeps them), against reading 16 columns too many on average.
ATTEND_BUCKET = 32
# Tokens one prefill pass takes at most (in slices of rows): its activations (the joined gate/up
# output alone is 44 kB per token at 7B) stay a few GB however many rows a call prefills.
PREFILL_CHUNK_TOKENS = 16384


class StaticKVCache:
    """k, v [layers, rows, kv_heads, max_len, head_dim] and valid [rows, max_len], borrowed from the
    device's KV arenas when they are free (`kv_arena.py`: same addresses call after call, so CUDA
    graphs outlive the call), else allocated for this cache alone. `max_len` may exceed what was asked.

    With `fp8=True` k and v hold fp8 values and k_scale, v_scale [layers, rows, kv_heads, max_len]
    their float32 scales (`fp8_kv.py`); otherwise the scales are None and k, v have the model's dtype.
    """

    def __init__(self, lm, rows: int, max_len: int, fp8: bool = False):
        cfg = lm.config
        weight = lm.embed_tokens.weight
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        lead = (cfg.num_hidden_layers, rows, self.kv_heads)
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
        arena = arena_for(device, dtype)
        lent = arena.lend(self, layers, rows, kv_heads, trailing, max_len)
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


@dataclass(frozen=True)
class CacheTensors:
    """What a forward pass reads of a cache, without the cache (and its hold on the arena)."""
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def rows(self, first: int, end: int) -> "CacheTensors":
        """The same cache restricted to rows first..end-1 (views: writes land in the cache)."""
        scales = [None if t is None else t[:, first:end] for t in (self.k_scale, self.v_scale)]
        return CacheTensors(self.k[:, first:end], self.v[:, first:end], self.valid[first:end], self.heads,
                            self.kv_heads, self.head_dim, *scales)

    def addresses(self) -> tuple:
        # Strides too: a compacted cache is a view with another row stride at the same address.
        tensors = (self.k, self.v, self.valid, self.k_scale, self.v_scale)
        return tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in tensors if t is not None)


def _rotary(lm, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Computed in float32 then cast, exactly as transformers' Llama rotary embedding does.
    inv_freq = lm.rotary_emb.inv_freq.float()
    freqs = positions.float().unsqueeze(-1) * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    scale = getattr(lm.rotary_emb, "attention_scaling", 1.0)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def forward_static(lm, cache: StaticKVCache, embeds: torch.Tensor, positions: torch.Tensor,
                   valid: torch.Tensor, first_rows: bool = False, columns: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """Run `embeds` [R, T, D] at per-row `positions` [R, T], writing cache columns used..used+T.

    `valid` [R, T] says which new columns other tokens may attend to (False: padding, or control
    tokens of a row that was not injected). Returns the final-norm hidden states [R, T, D].
    With `first_rows`, `embeds` are for the cache's first R rows only (the others are left alone).

    With `columns` [R, T] (device tensor) each row writes its own columns instead, and `used` stays
    where it is. A new token sees the valid columns below `used` that this pass does not write, the
    valid ones it writes for earlier tokens of its row, and its own. Invalid tokens may share a column
    (a scratch column, e.g. `used`, that a later pass overwrites); valid ones must not.

    With `rows` (a device tensor of cache row indices, one per input row; needs `columns`) the pass
    reads and writes those rows of the cache only; the others are left alone.
    """
    length = embeds.shape[1]
    end = cache.used + length if columns is None else max(cache.used, int(columns.max()) + 1)
    if end > cache.max_len:
        raise RuntimeError(f"KV cache full: {end} > {cache.max_len} columns")
    start = torch.tensor(cache.used, device=embeds.device)
    attend = attend_width(cache, end)
    tensors = cache.tensors()
    if rows is not None:
        if columns is None:
            raise ValueError("a pass over some rows of the cache writes columns of its own (`columns`)")
        return forward_at(lm, tensors, embeds, positions, valid, start, attend, columns, row_index=rows)
    rows = embeds.shape[0]
    if rows != cache.k.shape[1] and not first_rows:
        raise ValueError(f"{rows} rows of input for a cache of {cache.k.shape[1]}")
    chunk = max(1, PREFILL_CHUNK_TOKENS // length)
    if rows <= chunk:  # every decode step, and small prefills: one pass, no copy of the output
        hidden = forward_at(lm, tensors.rows(0, rows), embeds, positions, valid, start, attend, columns)
    else:  # rows never see each other: a prefill in slices of rows bounds its activations
        hidden = torch.cat([forward_at(lm, tensors.rows(a, min(a + chunk, rows)), embeds[a:a + chunk],
                                       positions[a:a + chunk], valid[a:a + chunk], start, attend,
                                       None if columns is None else columns[a:a + chunk])
                            for a in range(0, rows, chunk)])
    if columns is None:
        cache.used = end
    return hidden


def attend_width(cache: StaticKVCache, end: int) -> int:
    return min(cache.max_len, -(-end // ATTEND_BUCKET) * ATTEND_BUCKET)


def forward_at(lm, cache: StaticKVCache, embeds: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
               start: torch.Tensor, attend: int, columns: torch.Tensor | None = None,
               row_index: torch.Tensor | None = None) -> torch.Tensor:
    """The forward pass proper. The write column `start` is a device tensor and `attend` a plain
    int, so one captured CUDA graph serves every step whose columns fall in the same bucket.
    `columns` [R, T], when given, are per-row write columns, and `row_index` [R] the cache rows the
    input rows are (see `forward_static`)."""
    rows, length, _ = embeds.shape
    device = embeds.device
    if columns is None:
        write = start + torch.arange(length, device=device)  # [T]
        cache.valid.index_copy_(1, write, valid)
        mask = _shared_column_mask(cache.valid, write, attend)
    elif row_index is None:
        write = columns  # [R, T]
        cache.valid.scatter_(1, write, valid)
        mask = _own_column_mask(cache.valid, write, start, attend)
    else:
        write = columns
        row_valid = cache.valid[row_index].scatter_(1, write, valid)  # a copy: written back below
        cache.valid[row_index] = row_valid
        mask = _own_column_mask(row_valid, write, start, attend)
    cos, sin = _rotary(lm, positions, embeds.dtype)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def attend_kv(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if cache.k_scale is not None:
            return _attend_fp8(cache, i, q, k, v, write, start, attend, mask, row_index)
        _write_columns(cache.k[i], write, k, row_index)
        _write_columns(cache.v[i], write, v, row_index)
        return F.scaled_dot_product_attention(q, _read(cache.k[i], attend, row_index),
                                              _read(cache.v[i], attend, row_index), attn_mask=mask,
                                              enable_gqa=cache.kv_heads != cache.heads)

    joined = getattr(lm, FUSED_ATTR, None)
    if joined is not None:
        x, delta = embeds, None
        shape = (cache.heads, cache.kv_heads, cache.head_dim)
        for i, layer in enumerate(lm.layers):
            x, delta = fused_layer(layer, joined, i, x, delta, cos, sin, shape, partial(attend_kv, i))
        return finish(x, delta, lm.norm)
    x = embeds
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(rows, length, cache.heads, cache.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(rows, length, cache.kv_heads, cache.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(rows, length, cache.kv_heads, cache.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = attend_kv(i, q, k, v)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(rows, length, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return lm.norm(x)


def _shared_column_mask(valid: torch.Tensor, write: torch.Tensor, attend: int) -> torch.Tensor:
    """[R, 1, T, A]: new token t (column write[t]) sees the valid columns up to its own."""
    columns = torch.arange(attend, device=write.device)
    causal = columns.unsqueeze(0) <= write.unsqueeze(1)  # [T, A]
    # A query always sees its own column, so padded queries never produce NaNs that could reach
    # the cache; nobody else attends to an invalid column.
    own = columns.unsqueeze(0) == write.unsqueeze(1)
    return ((valid[:, None, :attend] & causal.unsqueeze(0)) | own.unsqueeze(0)).unsqueeze(1)


def _own_column_mask(valid: torch.Tensor, write: torch.Tensor, start: torch.Tensor, attend: int) -> torch.Tensor:
    """[R, 1, T, A] for per-row write columns write [R, T]: new token t of row r sees what row r
    held below `start` (the shared write column) before this pass, the columns this pass wrote for
    its tokens 0..t, each where valid, and its own column."""
    columns = torch.arange(attend, device=write.device)
    own = columns == write.unsqueeze(-1)  # [R, T, A]
    written_so_far = own.cumsum(1) > 0  # columns of tokens 0..t of the row
    held = (columns < start) & ~own.any(1, keepdim=True)  # [R, 1, A]
    return ((valid[:, None, :attend] & (held | written_so_far)) | own).unsqueeze(1)


def _write_columns(values: torch.Tensor, write: torch.Tensor, new: torch.Tensor,
                   row_index: torch.Tensor | None = None) -> None:
    """values [R, H, L, ...] <- new [R', H, T, ...] at columns `write`: [T] shared or [R', T] per row;
    with `row_index` [R'], into those rows of `values` only."""
    if row_index is not None:
        heads = torch.arange(values.shape[1], device=values.device)
        values[row_index.view(-1, 1, 1), heads.view(1, -1, 1), write.unsqueeze(1)] = new
        return
    if write.dim() == 1:
        values.index_copy_(2, write, new)
        return
    index = write.view(write.shape[0], 1, write.shape[1], *([1] * (new.dim() - 3))).expand(new.shape)
    values.scatter_(2, index, new)


def _read(values: torch.Tensor, attend: int, row_index: torch.Tensor | None) -> torch.Tensor:
    """values [R, H, L, ...] up to column `attend`: every row (a view), or a copy of `row_index`'s."""
    return values[:, :, :attend] if row_index is None else values[row_index, :, :attend]


def _attend_fp8(cache, i: int, q, k, v, write, start, attend: int, mask, row_index=None):
    """attend_kv over an fp8 cache: quantize the new columns, then read fp8 (a kernel for one query)."""
    if cache.kv_heads != cache.heads:
        raise ValueError("the fp8 KV cache does not support grouped-query attention")
    quant = KERNELS.get("quantize_kv", quantize, q.device)
    for values, scales, new in ((cache.k, cache.k_scale, k), (cache.v, cache.v_scale, v)):
        new8, new_scale = quant(new)
        # byte copies: any fp8 build
        _write_columns(values[i].view(torch.uint8), write, new8.view(torch.uint8), row_index)
        _write_columns(scales[i], write, new_scale, row_index)
    parts = [_read(t[i], attend, row_index) for t in (cache.k, cache.k_scale, cache.v, cache.v_scale)]
    if q.shape[2] == 1 and write.dim() == 1:  # the kernel knows one shared write column only
        return decode_attention(q, *parts, cache.valid[:, :attend], start, mask)
    return reference_attention(q, *parts, mask)
