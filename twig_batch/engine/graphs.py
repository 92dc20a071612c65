"""CUDA-graph replay of the one-token decode step over the static KV cache.

One graph per attention bucket (the cache width a step reads); a step then costs one replay instead
of hundreds of kernel launches.

A capture costs an eager warm-up step and a pass of Python over the whole model, a large share of
a short call. Who owns what: graphs over a cache lent by the engine's KV arena belong to the
engine's `KeptGraphs` (known by the embedding, the cache's addresses and shape, and the attention
kernels allowed) and are replayed by every later call that borrows the same shape; graphs over a
cache of its own die with the call. The engine captures the image step's graphs for its call size
at its sizing step (`runner.Engine.reserve`: every bucket `decode_buckets` lists for the image
call's columns), so a worker's first call replays; any other (row count, bucket) is captured the
first time a step lands in it. Each graph set runs the engine's `fused.FastModel`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from twig_batch.engine.forward import CacheTensors, forward_at
from twig_batch.engine.fused import FastModel
from twig_batch.engine.repeatable import attention_backends
from twig_batch.engine.static_decoder import StaticKVCache, attend_width, bucket_width

KEPT_GRAPH_SETS = 8  # graph sets kept across calls (one per row count and embedding in use)


def decode_buckets(first_column: int, steps: int, max_len: int) -> list[int]:
    """The attention buckets, in order, that `steps` one-token decode steps read when the first
    writes column `first_column` of a cache `max_len` wide (the steps' `attend_width`s)."""
    return sorted({bucket_width(column + 1, max_len) for column in range(first_column, first_column + steps)})


class GraphedDecodeStep:
    """`embed` maps a token id per row [R] to input embeddings [R, D] (image codes or text), `kind`
    names it; graphs over an arena cache are kept in `kept` (the engine's) when given."""

    def __init__(self, model: FastModel, cache: StaticKVCache, embed, kind: str, kept: KeptGraphs | None = None):
        self.cache = cache
        self.graphs = kept.graph_set(model, cache, embed, kind) if kept is not None else GraphSet(
            model, cache.tensors(), embed)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [R], positions [R, 1]: the last-layer hidden states [R, D] after this step."""
        end = self.cache.used + 1
        if end > self.cache.max_len:
            raise RuntimeError(f"KV cache full: {end} > {self.cache.max_len} columns")
        out = self.graphs.replay(tokens, positions, self.cache.used, attend_width(self.cache, end))
        self.cache.used = end
        return out


class GraphSet:
    """The captured steps over one cache's tensors, with the static inputs they read."""

    def __init__(self, model: FastModel, tensors: CacheTensors, embed):
        rows = tensors.k.shape[1]
        device = tensors.k.device
        self.model, self.tensors, self.embed = model, tensors, embed
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.valid = torch.ones((rows, 1), dtype=torch.bool, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def replay(self, tokens: torch.Tensor, positions: torch.Tensor, start: int, attend: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.start.fill_(start)
        self.capture(attend)
        graph, out = self.graphs[attend]
        graph.replay()
        return out.clone()

    def capture(self, attend: int) -> None:
        """The graph of bucket `attend`, captured now unless it already is."""
        if attend not in self.graphs:
            self.graphs[attend] = self._capture(attend)

    def _body(self, attend: int) -> torch.Tensor:
        embeds = self.embed(self.tokens).unsqueeze(1)
        return forward_at(self.model, self.tensors, embeds, self.positions, self.valid, self.start,
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


class KeptGraphs:
    """One engine's graph sets over arena caches, kept across calls: at most KEPT_GRAPH_SETS, the
    least recently used dropped first. A set is known by the embedding it steps ("image" or
    "text"), its cache's addresses and shape, and the attention kernels allowed."""

    def __init__(self) -> None:
        self._sets: OrderedDict[tuple, GraphSet] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sets)

    def __iter__(self):
        return iter(list(self._sets.values()))

    def __contains__(self, graph_set) -> bool:
        return any(kept is graph_set for kept in self._sets.values())

    def graph_set(self, model: FastModel, cache: StaticKVCache, embed, kind: str) -> GraphSet:
        tensors = cache.tensors()
        if not cache.arena:
            return GraphSet(model, tensors, embed)
        key = (kind, tensors.addresses(), attention_backends())
        kept = self._sets.get(key)
        if kept is None:
            kept = self._sets[key] = GraphSet(model, tensors, embed)
        self._sets.move_to_end(key)
        while len(self._sets) > KEPT_GRAPH_SETS:
            self._sets.popitem(last=False)
        return kept

    def forget(self, arena=None) -> None:
        """Drop every kept graph (their memory pools with them). Called before an arena drops its
        buffer: graphs over it would write to freed memory, and their views would keep the old buffer
        alive beside the new one. Buffers are replaced only while a worker's shapes still grow (its
        first batches), so dropping every kept graph costs little."""
        self._sets.clear()
