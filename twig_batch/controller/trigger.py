"""Trigger: is an image drifting away from its prompt, or is the model unsure and off-prompt?

`trigger_fires` is the rule and nothing else (a pure function over tensors); `TriggerState` keeps
the little history one image needs for it (previous similarity, sliding window of similarities).
"""
from __future__ import annotations

import math
from collections import deque

import torch

from twig_batch.controller.config import ControllerConfig


def trigger_fires(s: torch.Tensor, delta_s: torch.Tensor, var_s: torch.Tensor, u: torch.Tensor,
                  config: ControllerConfig) -> torch.Tensor:
    """(delta_s < -tau_drop and var_s > tau_var) or (u > tau_entropy and s < tau_sim), elementwise.

    All comparisons are strict, so a value exactly on a threshold never fires; NaN (no previous
    evaluation yet) never fires either.
    """
    drifting = (delta_s < -config.tau_drop) & (var_s > config.tau_var)
    lost = (u > config.tau_entropy) & (s < config.tau_sim)
    return drifting | lost


class TriggerState:
    """One image's similarity history within one band."""

    __slots__ = ("previous", "recent")

    def __init__(self, var_window: int):
        self.previous: float | None = None
        self.recent: deque[float] = deque(maxlen=var_window)

    def update(self, s: float) -> tuple[float, float]:
        """Record s_t; return (delta_s against the previous evaluation or NaN, population variance
        of the last `var_window` similarities including s_t)."""
        delta = math.nan if self.previous is None else s - self.previous
        self.previous = s
        self.recent.append(s)
        mean = sum(self.recent) / len(self.recent)
        var = sum((x - mean) ** 2 for x in self.recent) / len(self.recent)
        return delta, var
