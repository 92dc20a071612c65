"""Shaper: a control vector -> K control-token embeddings the language model reads like any input."""
from __future__ import annotations

import torch
from torch import nn


class Shaper(nn.Module):
    def __init__(self, hidden_size: int, control_tokens: int):
        super().__init__()
        self.control_tokens = control_tokens
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, control_tokens * hidden_size))

    def forward(self, c_vec: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, K, D]; the engine gives both CFG rows of an image the same K tokens."""
        b, d = c_vec.shape
        return self.mlp(c_vec).view(b, self.control_tokens, d)
