"""Bit-for-bit repeatable runs on a GPU, at a price (`GenerationSettings.deterministic`).

For the masked one-query attention of a decode step in bf16, PyTorch picks cuDNN's fused kernel: the
fastest, but on an H200 it does not give the same bits twice once a step reads more than about 128
columns, so the same seeds give images that part after ~65 tokens (`benchmarks/determinism_probe.py`,
results in benchmarks/README.md). PyTorch's memory-efficient kernel repeats itself bit for bit and
takes about twice as long per decode step's attention. The CPU path repeats itself either way.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

REPEATABLE_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # math where the first cannot run


@contextmanager
def attention_for(deterministic: bool):
    """Within it, `scaled_dot_product_attention` uses only kernels that repeat themselves when
    `deterministic`; otherwise it changes nothing."""
    if not deterministic:
        yield
        return
    with sdpa_kernel(REPEATABLE_BACKENDS):
        yield


def attention_backends() -> tuple[bool, ...]:
    """The attention kernels PyTorch may use now: part of a CUDA graph's identity, since a graph
    replays the kernels it was captured with."""
    cuda = torch.backends.cuda
    return (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
            cuda.math_sdp_enabled())
