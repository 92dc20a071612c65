"""The seam between the image-token loop and anything that watches it (the latent controller).

After each sampled image token the loop calls `observer.observe(...)`. An observer that wants to
steer returns an `Injection`: control-token embeddings and the images (rows) they apply to. The loop
appends those tokens to the KV cache of exactly those images' CFG row pairs, then carries on; other
images' caches and logits are untouched.

An observer may also offer `observe_deferred(...)`, returning None or an object whose `resolve()`
gives the `Injection` (or None) later: the fast engine then queues the next decode step before
reading the verdict, so the device does not wait on the host every step (`engine/fast.py`).

An observer names, as `max_control_slots`, the most control tokens it may give one image in one
drawing call: the fast engine reserves that many cache columns per image (64 when it names none)
and refuses an injection past them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Injection:
    embeds: torch.Tensor  # [B, K, D]: K control tokens per image (both CFG rows get the same)
    rows: torch.Tensor  # [B] bool: which images are injected


class ImageTokenObserver(Protocol):
    def begin_band(self, images: list[int], band: int) -> None:
        """Called before each drawing call: row b of the coming calls is request `images[b]`."""

    def observe(self, step: int, hidden: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor) -> Injection | None:
        """step: index of the image token just sampled (0..grid*grid-1, global in the image);
        hidden: [B, D] last-layer hidden state of each image's conditional row that produced `logits`;
        logits: [B, V] guided image-token logits; tokens: [B] the sampled tokens."""

    def trigger_log(self, image: int) -> list[dict]:
        """Every evaluation made for request `image` so far, in order."""
