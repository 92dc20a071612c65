"""An fp8 KV cache: half the bytes a decode step reads, which is most of what it costs.

At a few hundred rows a decode step of the 7B model spends about two thirds of its time reading the
KV cache (a bf16 cache reads 491,520 bytes per row per column). Stored as fp8 (e4m3) with one float32
scale per row, head and column (the largest magnitude of that head's vector maps to 448, e4m3's
largest number), the cache reads half that, plus 1/32 for the scales.

Writes quantize; a one-token decode step attends with `decode_attention`, a Triton kernel on a GPU
that reads the fp8 values and scales directly (one program per row and head, online softmax over
blocks of columns); prefills, and every step off a GPU, dequantize the columns they read and use
PyTorch's attention (`reference_attention`, also the kernel's yardstick). Not token-exact with the
bf16 cache: it is a separate, opt-in precision (`GenerationSettings.kv_cache = "fp8"`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
TINY = 1e-12  # the scale of an all-zero vector: anything positive dequantizes it to zeros


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (fp8 values [..., D], float32 scales [...]) with x ~ values * scales."""
    scale = (x.abs().amax(dim=-1).float() / FP8_MAX).clamp(min=TINY)
    return (x.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.float() * scales.unsqueeze(-1)).to(dtype)


def reference_attention(q: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, v8: torch.Tensor,
                        v_scale: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [R, H, T, D]; k8, v8 [R, H, A, D] fp8 with scales [R, H, A]; mask [R, 1, T, A] bool."""
    k = dequantize(k8, k_scale, q.dtype)
    v = dequantize(v8, v_scale, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def decode_attention(q: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, v8: torch.Tensor,
                     v_scale: torch.Tensor, valid: torch.Tensor, write: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """One query per row (T = 1). valid [R, A] and the write column `write` (a 0-d device tensor) say
    what the kernel may read (valid columns up to the query's own, which it always sees); `mask` is
    the same rule as a tensor, for the fallback."""
    if q.device.type != "cuda" or _kernel() is None:
        return reference_attention(q, k8, k_scale, v8, v_scale, mask)
    rows, heads, _, head_dim = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    _kernel()[(rows, heads)](
        q, k8.view(torch.uint8), k_scale, v8.view(torch.uint8), v_scale, valid, write, out,
        q.stride(0), q.stride(1), k8.stride(0), k8.stride(1), k8.stride(2), k_scale.stride(0), k_scale.stride(1),
        valid.stride(0), out.stride(0), out.stride(1), k8.shape[2], 1.0 / math.sqrt(head_dim),
        HEAD_DIM=head_dim, BLOCK_N=128, num_warps=2,  # the fastest of 32/64/128 x 2/4/8 on an H200 (step_profile)
    )
    return out


_KERNEL: list = []


def _kernel():
    """The Triton kernel, built on first use; None where Triton is missing."""
    if not _KERNEL:
        try:
            from twig_batch.engine.fp8_triton import fp8_decode_attention_kernel
        except ImportError:
            fp8_decode_attention_kernel = None
        _KERNEL.append(fp8_decode_attention_kernel)
    return _KERNEL[0]
