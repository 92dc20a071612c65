"""Counter-based random numbers: a pure function of (row seed, step, stream, vocabulary index).

Sampling noise never depends on which rows share a batch, on the device or on the schedule. Every
integer stays below 2**63 (32-bit values times constants below 2**31), so int64 arithmetic never
overflows on any backend.
"""
from __future__ import annotations

import torch

from twig_batch.seeds import STREAM_IMAGE

_MASK32 = 0xFFFFFFFF
MIX_1 = 0x7FEB352D
MIX_2 = 0x5BD1E995
GOLDEN = 0x1E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * MIX_1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_2) & _MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, step: int | torch.Tensor, stream: int) -> torch.Tensor:
    """One 32-bit key per row for this step; seeds is an int64 tensor [B], `step` one step for every
    row or an int64 tensor [B] of each row's own."""
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32
    key = _mix32(((stream * GOLDEN + torch.as_tensor(step, device=seeds.device)) & _MASK32).expand_as(seeds))
    key = _mix32(key ^ hi)
    return _mix32(key ^ lo)


def uniform_noise(seeds: torch.Tensor, step: int, width: int, stream: int = STREAM_IMAGE) -> torch.Tensor:
    """Uniform numbers in (0, 1), shape [B, width], float64, one independent stream per row."""
    return noise_from_keys(row_keys(seeds, step, stream), width)


def noise_from_keys(keys: torch.Tensor, width: int) -> torch.Tensor:
    """`uniform_noise` from the rows' keys [B] (split out so a GPU can fuse it with its use)."""
    index = torch.arange(width, device=keys.device, dtype=torch.int64).unsqueeze(0)
    bits = _mix32(_mix32(keys.unsqueeze(1) ^ ((index * GOLDEN) & _MASK32)) ^ index)
    return (bits.to(torch.float64) + 0.5) / 4294967296.0
