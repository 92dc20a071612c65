"""Hand-written Triton kernels for the engine's hot element-wise helpers, so a GPU worker never
starts PyTorch's compiler.

`torch.compile` made these helpers one kernel each, but a worker paid the compiler's own start on
every launch: ~9 s with every kernel in PyTorch's disk cache and ~25 s with none (two H200s, a
random 7B; half as many graphs to compile saved nothing, so it is the compiler's start, not the
graphs). A Triton kernel is compiled once per machine into Triton's own cache and loaded from it in
milliseconds after that.

Each function here takes and returns what its as-written twin takes and returns (`forward._rms_norm`,
`_add_rms_norm`, `_rotate`, `_silu_mul`, `sampling._gumbel_argmax`); `HAND_WRITTEN` maps the helper
names `fused.Kernels` knows to them. The arithmetic is the compiler's: bf16/fp16 inputs are read
into float32, computed there and rounded once on the way out (as the compiled kernels did; the
as-written helpers round after each operation), and the row reductions run per row, so a row's
result never depends on the rows beside it. The sampling kernel computes the same counter-based
noise as `noise.noise_from_keys` (32-bit wrap-around arithmetic) and the same float64 Gumbel-max,
without holding the [rows, vocabulary] noise in memory.

Importing this module imports Triton: where that fails, `fused.Kernels` compiles the helpers instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from twig_batch.engine import noise

COMPUTED_IN_FLOAT32 = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(*tensors: torch.Tensor) -> None:
    """The kernels compute in float32: a float64 model keeps its precision as written (the caller
    falls back, and says so)."""
    for t in tensors:
        if t.dtype not in COMPUTED_IN_FLOAT32:
            raise TypeError(f"the Triton kernels compute in float32; {t.dtype} runs as written")


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, width] over its last dimension (a copy only where the rows are not laid out that way)."""
    rows = x.reshape(-1, x.shape[-1])  # a view where the leading dimensions merge, else a contiguous copy
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, total_ptr, weight_ptr, out_ptr, width, x_stride, delta_stride,
                     eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * delta_stride + cols, mask=inside, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(total_ptr.dtype.element_ty)  # the stream's dtype
        tl.store(total_ptr + row * width + cols, x, mask=inside)
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, axis=0) / width + eps)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    # As written: the normalised row is rounded to the model's dtype, then scaled by the weight.
    normed = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=inside)


def _norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    _check_dtype(x, weight, *([] if delta is None else [delta]))
    weight = weight.contiguous()  # read as one row
    shape, width = x.shape, x.shape[-1]
    rows = _rows_of(x)
    deltas = _rows_of(delta) if delta is not None else rows
    total = torch.empty(shape, dtype=x.dtype, device=x.device) if delta is not None else x
    out = torch.empty(shape, dtype=torch.result_type(weight, x), device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, deltas, total, weight, out, width, rows.stride(0),
                                           deltas.stride(0), eps, HAS_DELTA=delta is not None,
                                           BLOCK=triton.next_power_of_2(width), num_warps=8)
    return total, out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    return _norm(x, delta, weight, eps)


@triton.jit
def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, length,
                   xs_r, xs_h, xs_t, cs_r, cs_t, os_r, os_h, os_t,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program per (row, token): every head's two halves, rotated with that token's angles."""
    at = tl.program_id(0).to(tl.int64)
    r, t = at // length, at % length
    head = tl.arange(0, BLOCK_H)[:, None]
    lo = tl.arange(0, HALF)[None, :]
    inside = head < heads
    x_at = x_ptr + r * xs_r + t * xs_t + head * xs_h
    x1 = tl.load(x_at + lo, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF + lo, mask=inside, other=0.0).to(tl.float32)
    angle_at = r * cs_r + t * cs_t + lo
    cos1 = tl.load(cos_ptr + angle_at).to(tl.float32)
    cos2 = tl.load(cos_ptr + angle_at + HALF).to(tl.float32)
    sin1 = tl.load(sin_ptr + angle_at).to(tl.float32)
    sin2 = tl.load(sin_ptr + angle_at + HALF).to(tl.float32)
    out_at = out_ptr + r * os_r + t * os_t + head * os_h
    kind = out_ptr.dtype.element_ty
    tl.store(out_at + lo, (x1 * cos1 - x2 * sin1).to(kind), mask=inside)
    tl.store(out_at + HALF + lo, (x2 * cos2 + x1 * sin2).to(kind), mask=inside)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [R, H, T, d] (any strides) rotated by cos, sin [R, 1, T, d] (broadcast over heads)."""
    _check_dtype(x, cos, sin)
    rows, heads, length, dim = x.shape
    half = dim // 2
    if dim % 2 or half & (half - 1):
        raise ValueError(f"the rotary kernel needs a head size of twice a power of two, not {dim}")
    cos, sin = cos.expand(rows, 1, length, dim), sin.expand(rows, 1, length, dim)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x, dtype=torch.result_type(x, cos))
    if x.numel():
        _rotate_kernel[(rows * length,)](x, cos, sin, out, heads, length,
                                         x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(2),
                                         out.stride(0), out.stride(1), out.stride(2),
                                         HALF=half, BLOCK_H=triton.next_power_of_2(heads), num_warps=4)
    return out


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, intermediate, row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < intermediate
    gate = tl.load(gate_up_ptr + row * row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * row_stride + intermediate + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * intermediate + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty),
             mask=inside)


def silu_mul(gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2 * intermediate] = [gate | up]."""
    _check_dtype(gate_up)
    rows = _rows_of(gate_up)
    out = torch.empty(*gate_up.shape[:-1], intermediate, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if rows.shape[0]:
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(intermediate, block))](
            rows, out, intermediate, rows.stride(0), BLOCK=block, num_warps=4)
    return out


_MIX_1: tl.constexpr = tl.constexpr(noise.MIX_1)  # a kernel reads module constants only as constexpr
_MIX_2: tl.constexpr = tl.constexpr(noise.MIX_2)
_GOLDEN: tl.constexpr = tl.constexpr(noise.GOLDEN)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * _MIX_1
    x = x ^ (x >> 15)
    x = x * _MIX_2
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, keys_ptr, out_ptr, row_stride, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: argmax over the vocabulary of logits + Gumbel noise, the first index on a tie. The
    vocabulary size is a compile-time constant (a model has two: image codes and text)."""
    row = tl.program_id(0).to(tl.int64)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    best = tl.full([], -float("inf"), tl.float64)
    best_at = tl.full([], 0, tl.int64)
    for start in tl.range(0, VOCAB, BLOCK):
        index = start + tl.arange(0, BLOCK)
        inside = index < VOCAB
        at = index.to(tl.uint32)
        bits = _mix32(_mix32(key ^ (at * _GOLDEN)) ^ at)  # uint32: the wrap-around noise.py masks to 32 bits
        uniform = (bits.to(tl.float64) + 0.5) / 4294967296.0
        logit = tl.load(logits_ptr + row * row_stride + index, mask=inside, other=-float("inf")).to(tl.float64)
        value = tl.where(inside, logit - tl.log(-tl.log(uniform)), -float("inf"))
        top = tl.max(value, axis=0)
        top_at = tl.argmax(value, axis=0).to(tl.int64) + start  # argmax: the first index of the maximum
        best_at = tl.where(top > best, top_at, best_at)  # strictly greater: an earlier block keeps a tie
        best = tl.maximum(best, top)
    tl.store(out_ptr + row, best_at)


def gumbel_argmax(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (float64), keys [B] (int64, 32-bit values) -> token ids [B] (int64)."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.shape[0]:
        _gumbel_argmax_kernel[(logits.shape[0],)](logits, keys.contiguous(), out, logits.stride(0),
                                                  VOCAB=logits.shape[1], BLOCK=2048, num_warps=8)
    return out


HAND_WRITTEN = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "rotate": rotate, "silu_mul": silu_mul,
                "gumbel_argmax": gumbel_argmax}
