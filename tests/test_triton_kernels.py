"""The engine's hand-written Triton kernels against the helpers they stand in for.

Run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, which conftest.py sets without a GPU): the
same kernel code a GPU compiles, so indexing, masking, the 32-bit noise arithmetic and the
reductions are checked here; speed and the bf16 rounding on a GPU are benchmarks/gpu_checks.sh's.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU runs these kernels itself: test_triton_kernels_gpu.py", allow_module_level=True)

from twig_batch.engine import triton_kernels as tk  # noqa: E402
from twig_batch.engine.forward import _add_rms_norm, _rms_norm, _rotate, _silu_mul  # noqa: E402
from twig_batch.engine.fused import Kernels  # noqa: E402
from twig_batch.engine.noise import row_keys  # noqa: E402
from twig_batch.engine.sampling import _gumbel_argmax  # noqa: E402


def _rounded_once_norm(total: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The compiled kernels' arithmetic: float32 throughout, the normalised row rounded, then scaled."""
    h = total.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h.to(total.dtype).float()).to(total.dtype)


def test_rms_norm_and_its_residual_add_match_the_helpers_in_float32():
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(3, 5, 96, generator=g), torch.randn(3, 5, 96, generator=g)
    weight = torch.randn(96, generator=g)
    torch.testing.assert_close(tk.rms_norm(x, weight, 1e-6), _rms_norm(x, weight, 1e-6), rtol=1e-5, atol=1e-5)
    total, normed = tk.add_rms_norm(x, delta, weight, 1e-6)
    want_total, want_normed = _add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-5)
    assert tk.rms_norm(x[:0], weight, 1e-6).shape == (0, 5, 96)  # no rows: no launch


def test_in_bfloat16_the_residual_sum_is_rounded_before_it_is_normalised():
    # The interpreter rounds float32 to bfloat16 towards zero where a GPU rounds to nearest, so
    # here the sums agree to one bfloat16 step; test_triton_kernels_gpu.py holds them equal on a GPU.
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 64, generator=g) * 3).bfloat16()
    delta = torch.randn(4, 64, generator=g).bfloat16()
    weight = torch.randn(64, generator=g).bfloat16()
    total, normed = tk.add_rms_norm(x, delta, weight, 1e-5)
    assert total.dtype == normed.dtype == torch.bfloat16
    torch.testing.assert_close(total, x + delta, rtol=2 ** -7, atol=0)
    torch.testing.assert_close(normed.float(), _rounded_once_norm(total, weight, 1e-5).float(), rtol=2 ** -6,
                               atol=1e-3)


def test_rotate_reads_a_transposed_view_and_broadcasts_the_angles_over_heads():
    g = torch.Generator().manual_seed(2)
    rows, length, heads, dim = 2, 3, 4, 16
    x = torch.randn(rows, length, heads, dim, generator=g).transpose(1, 2)  # [R, H, T, d], as the layer makes it
    angles = torch.randn(rows, length, dim // 2, generator=g)
    cos = torch.cat([angles.cos(), angles.cos()], -1).unsqueeze(1)
    sin = torch.cat([angles.sin(), angles.sin()], -1).unsqueeze(1)
    out = tk.rotate(x, cos, sin)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _rotate(x, cos, sin), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="head size"):
        tk.rotate(torch.randn(1, 1, 1, 12), cos[..., :12], sin[..., :12])
    with pytest.raises(TypeError, match="float64 runs as written"):  # a float64 model keeps its precision
        tk.rotate(x.double(), cos.double(), sin.double())


def test_silu_mul_splits_gate_and_up_by_the_intermediate_size():
    g = torch.Generator().manual_seed(3)
    gate_up = torch.randn(2, 3, 2 * 1500, generator=g)  # more than one block of columns
    torch.testing.assert_close(tk.silu_mul(gate_up, 1500), _silu_mul(gate_up, 1500), rtol=1e-6, atol=1e-6)


def test_gumbel_argmax_draws_exactly_the_tokens_of_the_written_noise():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 5000, generator=g, dtype=torch.float64) * 4  # three blocks, the last one short
    logits[1, 100:] = float("-inf")  # filtered by top-k: only the first hundred can be drawn
    logits[2] = 0.0  # the noise alone decides
    keys = row_keys(torch.tensor([0, 1, 2, 2**40 + 7, 12345, 99], dtype=torch.int64), step=17, stream=1)
    tokens = tk.gumbel_argmax(logits, keys)
    assert torch.equal(tokens, _gumbel_argmax(logits, keys))
    assert tokens[1] < 100


def test_a_gpu_takes_the_hand_written_kernels_and_never_starts_the_compiler(monkeypatch):
    def compiler_started(fn, **options):
        raise AssertionError("torch.compile was called for a hand-written helper")

    monkeypatch.setattr(torch, "compile", compiler_started)
    monkeypatch.setattr(Kernels, "compiles_on", lambda self, device: True)  # as on a GPU
    kernels = Kernels()
    x, weight = torch.randn(2, 32), torch.ones(32)
    for name, helper in (("rms_norm", _rms_norm),):
        torch.testing.assert_close(kernels.get(name, helper, x.device)(x, weight, 1e-6), _rms_norm(x, weight, 1e-6))
    assert set(tk.HAND_WRITTEN) == {"rms_norm", "add_rms_norm", "rotate", "silu_mul", "gumbel_argmax"}
    assert kernels.uncompiled == []


def test_a_hand_written_kernel_that_fails_runs_as_written_and_is_listed(monkeypatch):
    def broken(*args):
        raise RuntimeError("no such GPU feature")

    monkeypatch.setitem(tk.HAND_WRITTEN, "silu_mul", broken)
    monkeypatch.setattr(Kernels, "compiles_on", lambda self, device: True)
    kernels, gate_up = Kernels(), torch.randn(2, 8)
    with pytest.warns(UserWarning, match="running silu_mul uncompiled"):
        out = kernels.get("silu_mul", _silu_mul, gate_up.device)(gate_up, 4)
    assert torch.equal(out, _silu_mul(gate_up, 4))
    assert kernels.uncompiled == [{"name": "silu_mul", "error": "RuntimeError: no such GPU feature"}]
