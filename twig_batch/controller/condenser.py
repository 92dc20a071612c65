"""Condenser: a fixed set of memory tokens distilled from the latest image-token hidden states."""
from __future__ import annotations

import math

import torch
from torch import nn


class Condenser(nn.Module):
    """M learnable queries cross-attend over hidden states [B, S, D]; a residual MLP refines them.

    The keys carry no position: the memory depends on which states are in the window, not on their
    order, so a ring buffer can feed it directly.
    """

    def __init__(self, hidden_size: int, memory_tokens: int, heads: int):
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {heads} attention heads")
        self.heads = heads
        self.latents = nn.Parameter(torch.zeros(memory_tokens, hidden_size))
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [B, S, D] -> (memory tokens [B, M, D], their mean m_vec [B, D])."""
        b, s, d = states.shape
        m, h = self.latents.shape[0], self.heads
        q = self.query(self.latents).view(m, h, d // h).transpose(0, 1)  # [H, M, d/h]
        k = self.key(states).view(b, s, h, d // h).transpose(1, 2)  # [B, H, S, d/h]
        v = self.value(states).view(b, s, h, d // h).transpose(1, 2)
        scores = torch.matmul(q.unsqueeze(0), k.transpose(-1, -2)) / math.sqrt(d // h)  # [B, H, M, S]
        attended = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H, M, d/h]
        memory = self.out(attended.transpose(1, 2).reshape(b, m, d))
        memory = memory + self.mlp(memory)
        return memory, memory.mean(dim=1)
