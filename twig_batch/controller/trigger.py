"""Trigger: is an image drifting away from its prompt, or is the model unsure and off-prompt?

`trigger_fires` is the rule and nothing else (a pure function over tensors); `TriggerHistory` keeps
the little history each image needs for it (previous similarity, sliding window of similarities).
"""
from __future__ import annotations

import math

import torch

from twig_batch.settings import ControllerConfig


def trigger_fires(s: torch.Tensor, delta_s: torch.Tensor, var_s: torch.Tensor, u: torch.Tensor,
                  config: ControllerConfig) -> torch.Tensor:
    """(delta_s < -tau_drop and var_s > tau_var) or (u > tau_entropy and s < tau_sim), elementwise.

    All comparisons are strict, so a value exactly on a threshold never fires; NaN (no previous
    evaluation yet) never fires either.
    """
    drifting = (delta_s < -config.tau_drop) & (var_s > config.tau_var)
    lost = (u > config.tau_entropy) & (s < config.tau_sim)
    return drifting | lost


def fire_and_inject(s: torch.Tensor, delta_s: torch.Tensor, var_s: torch.Tensor, u: torch.Tensor, forced: torch.Tensor,
                    evaluated: torch.Tensor, injections: torch.Tensor, last_injection: torch.Tensor, step,
                    config: ControllerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(fired, injected) per row: fired where evaluated and the rule (or a forced fire) says so;
    injected where a fire gets past the guard rails (fewer than `max_injections_per_band` injections
    so far, at least `min_gap` steps since the last; `step` a number or a tensor over the rows)."""
    fired = (trigger_fires(s, delta_s, var_s, u, config) | forced) & evaluated
    injected = fired & (injections < config.max_injections_per_band) & (step - last_injection >= config.min_gap)
    return fired, injected


class TriggerHistory:
    """The similarity history of a band's images, one row per image, kept on the model's device.

    Per image: the previous evaluation's similarity (NaN before the first) and a ring of the last
    `var_window` similarities. Updating takes a mask of the images evaluated this step, so a whole
    batch is one set of tensor operations and nothing waits for the device.
    """

    __slots__ = ("previous", "ring", "count", "window")

    def __init__(self, images: int, var_window: int, device: torch.device | str = "cpu"):
        self.window = var_window
        self.previous = torch.full((images,), math.nan, dtype=torch.float64, device=device)
        self.ring = torch.zeros((images, var_window), dtype=torch.float64, device=device)
        self.count = torch.zeros(images, dtype=torch.long, device=device)

    @classmethod
    def of(cls, previous: torch.Tensor, ring: torch.Tensor, count: torch.Tensor) -> "TriggerHistory":
        """A history over the given state (rows kept elsewhere, e.g. gathered from a larger pool)."""
        history = cls.__new__(cls)
        history.previous, history.ring, history.count, history.window = previous, ring, count, ring.shape[1]
        return history

    def update(self, s: torch.Tensor, evaluated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record s [B] for the `evaluated` [B] images; return (delta_s against each image's previous
        evaluation, NaN before the first; population variance of its last `var_window` similarities
        including s), both NaN for images not evaluated."""
        s = s.to(torch.float64)
        delta = torch.where(evaluated, s - self.previous, math.nan)
        self.previous = torch.where(evaluated, s, self.previous)
        slot = (self.count % self.window).unsqueeze(1)
        written = self.ring.scatter(1, slot, s.unsqueeze(1))
        self.ring = torch.where(evaluated.unsqueeze(1), written, self.ring)
        self.count = self.count + evaluated.long()
        filled = torch.arange(self.window, device=s.device).unsqueeze(0) < self.count.unsqueeze(1)
        n = filled.sum(1).clamp(min=1).to(torch.float64)
        mean = (self.ring * filled).sum(1) / n
        var = (((self.ring - mean.unsqueeze(1)) * filled) ** 2).sum(1) / n
        return delta, torch.where(evaluated, var, math.nan)
