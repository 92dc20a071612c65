"""Deterministic seeds: one per (prompt id, sample), and the streams that keep noise apart.

A row's seed is a pure function of (base seed, prompt id, sample index), so an image never depends
on which other prompts share its batch, on the device, or on the order rows were scheduled. The
per-step random numbers drawn from a seed are `engine/noise.py`'s. No torch here: the batch driver
derives seeds without importing it.
"""
from __future__ import annotations

import hashlib

# Distinct streams keep image sampling, text sampling and controller noise independent.
STREAM_IMAGE = 1
STREAM_TEXT = 2


def derive_seed(base_seed: int, prompt_id: str, sample_index: int) -> int:
    """Seed for one (prompt id, sample) pair: stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(f"{base_seed}\x1f{prompt_id}\x1f{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
