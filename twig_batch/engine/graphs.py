"""CUDA-graph replay of the one-token decode step over the static KV cache.

One graph per attention bucket (the cache width a step reads), captured the first time a step
lands in that bucket; a step then costs one replay instead of hundreds of kernel launches.
"""
from __future__ import annotations

import torch

from twig_batch.engine.static_decoder import StaticKVCache, attend_width, forward_at


class GraphedDecodeStep:
    """`embed` maps a token id per row [R] to input embeddings [R, D] (image codes or text)."""

    def __init__(self, bundle, cache: StaticKVCache, embed):
        rows = cache.k.shape[1]
        device = bundle.device
        self.bundle, self.cache, self.embed = bundle, cache, embed
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.valid = torch.ones((rows, 1), dtype=torch.bool, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _body(self, attend: int) -> torch.Tensor:
        embeds = self.embed(self.tokens).unsqueeze(1)
        return forward_at(self.bundle.language_model, self.cache, embeds, self.positions, self.valid, self.start,
                          attend)[:, -1]

    def _capture(self, attend: int):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # One warm-up (lazy library set-up, compiled kernels) outside the capture; it writes the same
        # cache column the real step will. Each warm-up is an eager step: tens of ms at a few hundred rows.
        with torch.cuda.stream(stream):
            self._body(attend)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._body(attend)
        self.pool = graph.pool()
        return graph, out

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [R], positions [R, 1]: the last-layer hidden states [R, D] after this step."""
        end = self.cache.used + 1
        if end > self.cache.max_len:
            raise RuntimeError(f"KV cache full: {end} > {self.cache.max_len} columns")
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.start.fill_(self.cache.used)
        attend = attend_width(self.cache, end)
        if attend not in self.graphs:
            self.graphs[attend] = self._capture(attend)
        graph, out = self.graphs[attend]
        graph.replay()
        self.cache.used = end
        return out.clone()
