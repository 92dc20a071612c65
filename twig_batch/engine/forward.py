"""The fast tier's one forward pass: a decoder over the static KV cache's tensors.

`forward_at` runs the language model's layers at per-row positions, writing keys and values into
the cache's columns and attending through a mask built from the cache's validity flags, so every row
keeps its own positions and padding while all rows share the cache's shape. The write column is a
device tensor and the attended width a plain int, so one captured CUDA graph (`graphs.py`) serves
every decode step whose columns fall in the same bucket. The model comes as a `fused.FastModel`
(the engine's): with joined projections the same layer runs one matmul for q/k/v and one for gate/up,
and its element-wise work through the model's own `kernels` (one Triton kernel each on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from twig_batch.engine.fp8_kv import decode_attention, quantize, reference_attention
from twig_batch.engine.fused import FastModel, JoinedProjections


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


def forward_at(model: FastModel, cache: CacheTensors, embeds: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor, start: torch.Tensor, attend: int, columns: torch.Tensor | None = None,
               row_index: torch.Tensor | None = None) -> torch.Tensor:
    """The forward pass proper. The write column `start` is a device tensor and `attend` a plain
    int, so one captured CUDA graph serves every step whose columns fall in the same bucket.
    `columns` [R, T], when given, are per-row write columns, and `row_index` [R] the cache rows the
    input rows are (see `static_decoder.forward_static`). With `model.joined` each layer runs its
    joined projections and `model.kernels`; otherwise the model's own modules: the same layer either
    way (`_layer`)."""
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

    def attend_kv(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if cache.k_scale is not None:
            return _attend_fp8(model, cache, i, q, k, v, write, start, attend, mask, row_index)
        _write_columns(cache.k[i], write, k, row_index)
        _write_columns(cache.v[i], write, v, row_index)
        return F.scaled_dot_product_attention(q, _read(cache.k[i], attend, row_index),
                                              _read(cache.v[i], attend, row_index), attn_mask=mask,
                                              enable_gqa=cache.kv_heads != cache.heads)

    return run_layers(model, embeds, positions, (cache.heads, cache.kv_heads, cache.head_dim), attend_kv)


def run_layers(model: FastModel, embeds: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int, int],
               attend_kv) -> torch.Tensor:
    """The decoder's layers over `embeds` [R, T, D] at `positions` [R, T], then the final norm.
    `shape` is (heads, kv_heads, head_dim); `attend_kv(layer index, q, k, v)` keeps the layer's keys
    and values wherever its cache keeps them and returns the attention output [R, H, T, d]."""
    lm = model.lm
    cos, sin = _rotary(lm, positions, embeds.dtype)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x, delta = embeds, None
    for i, layer in enumerate(lm.layers):
        x, delta = _layer(layer, model.joined, model.kernels, i, x, delta, cos, sin, shape, partial(attend_kv, i))
    return _residual_norm(x, delta, lm.norm, None if model.joined is None else model.kernels)[1]


def _layer(layer, joined: JoinedProjections | None, kernels, index: int, x: torch.Tensor, delta: torch.Tensor | None,
           cos: torch.Tensor, sin: torch.Tensor, shape: tuple[int, int, int], attend_kv):
    """One decoder layer over the residual stream `x` plus the previous layer's pending `delta`.

    Returns the new (x, delta): each residual add goes with the RMSNorm that follows it (one kernel
    when fused), the last one with the model's final norm. `shape` is (heads, kv_heads, head_dim);
    `attend_kv(q, k, v)` writes k, v to the cache and returns the attention output [R, H, T, d].
    With `joined` the q/k/v and gate/up projections are one matmul each and the element-wise work
    runs through `kernels` (one kernel each on a GPU); without, the layer's own modules do the same arithmetic.
    """
    rows, length, _ = x.shape
    heads, kv_heads, head_dim = shape
    fused = joined is not None
    attn, mlp = layer.self_attn, layer.mlp
    fused_kernels = kernels if fused else None
    rotate = kernels.get("rotate", _rotate, x.device) if fused else _rotate
    x, h = _residual_norm(x, delta, layer.input_layernorm, fused_kernels)
    if fused:
        q, k, v = F.linear(h, joined.qkv[index]).split([joined.q_size, joined.kv_size, joined.kv_size], dim=-1)
    else:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    q = rotate(q.view(rows, length, heads, head_dim).transpose(1, 2), cos, sin)
    k = rotate(k.view(rows, length, kv_heads, head_dim).transpose(1, 2), cos, sin)
    v = v.view(rows, length, kv_heads, head_dim).transpose(1, 2)
    out = attn.o_proj(attend_kv(q, k, v).transpose(1, 2).reshape(rows, length, -1))
    x, h = _residual_norm(x, out, layer.post_attention_layernorm, fused_kernels)
    if not fused:
        return x, mlp(h)
    silu_mul = kernels.get("silu_mul", _silu_mul, x.device)
    return x, mlp.down_proj(silu_mul(F.linear(h, joined.gate_up[index]), joined.intermediate))


def _residual_norm(x: torch.Tensor, delta: torch.Tensor | None, norm_module, kernels):
    """(x + delta, its RMSNorm): one kernel of `kernels` when fused (given), else the add and the
    model's module."""
    if kernels is None:
        x = x if delta is None else x + delta
        return x, norm_module(x)
    device = x.device
    if delta is None:
        return x, kernels.get("rms_norm", _rms_norm, device)(x, norm_module.weight, norm_module.variance_epsilon)
    return kernels.get("add_rms_norm", _add_rms_norm, device)(x, delta, norm_module.weight,
                                                              norm_module.variance_epsilon)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    total = x + delta
    return total, _rms_norm(total, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _silu_mul(gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
    return F.silu(gate_up[..., :intermediate]) * gate_up[..., intermediate:]


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


def _attend_fp8(model: FastModel, cache, i: int, q, k, v, write, start, attend: int, mask, row_index=None):
    """attend_kv over an fp8 cache: quantize the new columns, then read fp8 (a kernel for one query)."""
    if cache.kv_heads != cache.heads:
        raise ValueError("the fp8 KV cache does not support grouped-query attention")
    quant = model.kernel("quantize_kv", quantize, q.device)
    for values, scales, new in ((cache.k, cache.k_scale, k), (cache.v, cache.v_scale, v)):
        new8, new_scale = quant(new)
        # byte copies: any fp8 build
        _write_columns(values[i].view(torch.uint8), write, new8.view(torch.uint8), row_index)
        _write_columns(scales[i], write, new_scale, row_index)
    parts = [_read(t[i], attend, row_index) for t in (cache.k, cache.k_scale, cache.v, cache.v_scale)]
    if q.shape[2] == 1 and write.dim() == 1:  # the kernel knows one shared write column only
        return decode_attention(q, *parts, cache.valid[:, :attend], start, mask)
    return reference_attention(q, *parts, mask)
