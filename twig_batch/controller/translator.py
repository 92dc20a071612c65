"""Translator: thought, visual memory and prompt -> one gated control vector per image."""
from __future__ import annotations

import torch
from torch import nn


class Translator(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * hidden_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.gate = nn.Linear(hidden_size, 1)  # one strength per image, squashed into [0, max_scale]

    def forward(self, z_vec: torch.Tensor, m_vec: torch.Tensor, p_vec: torch.Tensor, max_scale: float) -> torch.Tensor:
        """[B, D] x 3 -> control vector c [B, D], scaled by a learned gate in [0, max_scale]."""
        c = self.net(torch.cat([z_vec, m_vec, p_vec], dim=-1))
        return c * torch.sigmoid(self.gate(c)) * max_scale
