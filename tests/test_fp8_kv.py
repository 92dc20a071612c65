"""The opt-in fp8 KV cache: quantization bounds, the engine over it, and the decode kernel's math."""
import math

import pytest
import torch

from twig_batch.engine.fast import draw_image_tokens_fast
from twig_batch.engine.fp8_kv import FP8_MAX, dequantize, quantize, reference_attention
from twig_batch.engine.fused import FastModel
from twig_batch.engine.memory import kv_bytes_per_token
from twig_batch.engine.static_decoder import StaticKVCache, forward_static
from twig_batch.errors import InputError
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "blue sky over a long river with many clouds and a tiny boat", "cat"]


def test_each_vector_keeps_its_own_scale_within_e4m3_rounding():
    x = torch.randn(5, 3, 7, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[0, 0, 0] *= 1000  # one loud vector must not cost the others their precision
    x[1, 1, 1] = 0  # an all-zero vector stays zero
    values, scales = quantize(x)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == x.shape[:-1]
    back = dequantize(values, scales, torch.float64)
    amax = x.abs().amax(-1, keepdim=True)
    assert ((back - x).abs() <= amax * 2.0 ** -4 + 1e-30).all()  # 3 mantissa bits: half an ulp of 2^-3
    assert values.float().abs().amax(-1).max() == FP8_MAX  # the largest entry of a vector maps to 448
    assert not back[1, 1, 1].any()


def _cache_bytes(cache):
    tensors = [cache.k, cache.v, cache.k_scale, cache.v_scale]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def test_fp8_halves_the_cache_and_is_refused_for_unknown_names(tiny64):
    lm = tiny64.language_model
    cache = StaticKVCache(lm, rows=2, max_len=12, fp8=True)
    full = StaticKVCache(lm, rows=2, max_len=12)
    assert cache.k.dtype == torch.float8_e4m3fn and cache.k_scale.shape == cache.k.shape[:4]
    # What the memory planner counts per token is what the fp8 cache allocates, scales included,
    # and less than half the model-dtype cache.
    assert _cache_bytes(cache) == kv_bytes_per_token(lm, fp8=True) * 2 * 12
    assert 2 * _cache_bytes(cache) < _cache_bytes(full)
    with pytest.raises(InputError, match="kv cache"):
        GenerationSettings(kv_cache="int4")


def test_the_fp8_engine_is_batch_invariant_and_close_to_the_full_cache(tiny64):
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS]
    fp8 = GenerationSettings(top_k=100, kv_cache="fp8")
    together = draw_image_tokens_fast(tiny64, rows, [1, 2, 3], fp8, 40)
    for b in range(3):  # per-vector scales: no row's quantization depends on another row
        assert torch.equal(draw_image_tokens_fast(tiny64, rows[b:b + 1], [1 + b], fp8, 40)[0], together[b])
    lm = tiny64.language_model
    ids = torch.tensor([rows[1]])
    embeds = tiny64.embed_text(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    valid = torch.ones_like(ids, dtype=torch.bool)
    model = FastModel.plain(lm)
    exact = forward_static(model, StaticKVCache(lm, 1, ids.shape[1]), embeds, positions, valid)
    rounded = forward_static(model, StaticKVCache(lm, 1, ids.shape[1], fp8=True), embeds, positions, valid)
    gap = (rounded - exact).norm() / exact.norm()
    assert 0 < gap < 0.1  # fp8 rounding shows, but only as rounding


def _kernel_runs_here() -> bool:
    # Not in Triton's interpreter: its loop over a run-time column count needs Triton's conversion of
    # a scalar to an index, which numpy 2 refuses there.
    pytest.importorskip("triton")
    return torch.cuda.is_available()


def test_the_decode_kernel_equals_the_dequantizing_reference():
    if not _kernel_runs_here():
        pytest.skip("needs a GPU")
    from twig_batch.engine.fp8_triton import fp8_decode_attention_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    rows, heads, columns, head_dim = 3, 2, 100, 16
    q = torch.randn(rows, heads, 1, head_dim, generator=g).to(device)
    k8, k_scale = quantize((torch.randn(rows, heads, columns, head_dim, generator=g) * 3).to(device))
    v8, v_scale = quantize(torch.randn(rows, heads, columns, head_dim, generator=g).to(device))
    valid = (torch.rand(rows, columns, generator=g) > 0.3).to(device)
    valid[0, 70] = False  # the query's own column counts even when not marked valid
    write = torch.tensor(70, device=device)
    cols = torch.arange(columns, device=device)
    mask = ((valid & (cols <= write)) | (cols == write))[:, None, None, :]
    out = torch.empty_like(q)
    fp8_decode_attention_kernel[(rows, heads)](
        q, k8.view(torch.uint8), k_scale, v8.view(torch.uint8), v_scale, valid, write, out,
        q.stride(0), q.stride(1), k8.stride(0), k8.stride(1), k8.stride(2), k_scale.stride(0), k_scale.stride(1),
        valid.stride(0), out.stride(0), out.stride(1), columns, 1 / math.sqrt(head_dim), HEAD_DIM=head_dim,
        BLOCK_N=32)
    expected = reference_attention(q, k8, k_scale, v8, v_scale, mask)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4)
