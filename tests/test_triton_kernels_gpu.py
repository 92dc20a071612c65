"""The hand-written Triton kernels on a GPU, in the model's dtype: each rounds once where the
compiled kernels did, so they equal a float32 computation rounded once, up to the order of a
row's sum (one bfloat16 step at most, on few elements). Skipped without a GPU; the GPU checks run it."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a GPU", allow_module_level=True)
pytest.importorskip("triton")

from twig_batch.engine import triton_kernels as tk  # noqa: E402
from twig_batch.engine.noise import row_keys  # noqa: E402
from twig_batch.engine.sampling import _gumbel_argmax  # noqa: E402

CUDA = torch.device("cuda")


def _bf16_steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def test_residual_add_and_norm_round_once_in_bfloat16():
    g = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(256, 4096, device=CUDA, generator=g).bfloat16()
    delta = torch.randn(256, 4096, device=CUDA, generator=g).bfloat16()
    weight = torch.randn(4096, device=CUDA, generator=g).bfloat16()
    total, normed = tk.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)  # a bfloat16 add rounds once either way
    h = total.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    want = (weight.float() * h.bfloat16().float()).bfloat16()
    steps = _bf16_steps_apart(normed, want)
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01


def test_rotate_and_silu_mul_round_once_in_bfloat16():
    g = torch.Generator(device=CUDA).manual_seed(1)
    rows, length, heads, dim = 4, 7, 32, 128
    x = torch.randn(rows, length, heads, dim, device=CUDA, generator=g).bfloat16().transpose(1, 2)
    angles = torch.randn(rows, length, dim // 2, device=CUDA, generator=g)
    cos = torch.cat([angles.cos(), angles.cos()], -1).bfloat16().unsqueeze(1)
    sin = torch.cat([angles.sin(), angles.sin()], -1).bfloat16().unsqueeze(1)
    xf, half = x.float(), dim // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], -1)
    assert torch.equal(tk.rotate(x, cos, sin), (xf * cos.float() + rotated * sin.float()).bfloat16())
    gate_up = torch.randn(3, 5, 2 * 11008, device=CUDA, generator=g).bfloat16()
    gate, up = gate_up[..., :11008].float(), gate_up[..., 11008:].float()
    steps = _bf16_steps_apart(tk.silu_mul(gate_up, 11008), (gate * torch.sigmoid(gate) * up).bfloat16())
    assert steps.max() <= 1  # the GPU's sigmoid against PyTorch's


def test_gumbel_argmax_draws_the_written_noise_tokens_on_a_gpu():
    g = torch.Generator(device=CUDA).manual_seed(2)
    for vocab in (16384, 102400):
        logits = torch.randn(64, vocab, device=CUDA, generator=g, dtype=torch.float64) * 3
        keys = row_keys(torch.arange(64, device=CUDA) * 7919, step=5, stream=2)
        assert torch.equal(tk.gumbel_argmax(logits, keys), _gumbel_argmax(logits, keys))
