"""The mixed loop's one-token steps at fixed shapes, replayed as CUDA graphs on a GPU.

A step in which every row feeds one token (every row decoding: most of a run's steps) is laid out
in fixed-shape buffers: its rows rounded up to a multiple of ROW_BUCKET (the extra rows pad: they
write the pool's scratch page and read only themselves) and its longest row to a multiple of
`paged_attention.LENGTH_BUCKET`. Each (rows, length) bucket is captured once per loop as a CUDA
graph over those buffers and the pool, so a step costs one replay instead of hundreds of launches.
Off a GPU the same buffers run eagerly (what the tests hold to the reference).
"""
from __future__ import annotations

import torch

from twig_batch.engine.forward import run_layers
from twig_batch.engine.fused import FastModel
from twig_batch.engine.transfer import to_device
from twig_batch.engine.mixed.pages import PagePool
from twig_batch.engine.mixed.step import chunk_embeds
from twig_batch.engine.mixed.paged_attention import (LENGTH_BUCKET, StepLayout, gathered_attention,
                                                     paged_attention)

ROW_BUCKET = 32


def bucket(value: int, size: int) -> int:
    return -(-value // size) * size


class DecodeSteps:
    """One-token steps over `pool` by (rows, length) bucket; `capture`: as CUDA graphs."""

    def __init__(self, model: FastModel, pool: PagePool, capture: bool):
        self.model, self.pool, self.capture = model, pool, capture
        self.steps: dict[tuple[int, int], _FixedStep] = {}
        self.memory = None  # the graphs' shared memory pool

    def __call__(self, chunks) -> torch.Tensor:
        """The hidden states [len(chunks), D] after feeding each chunk's one token."""
        count = len(chunks)
        held = [c.sequence.length for c in chunks]
        key = (bucket(count, ROW_BUCKET), bucket(max(held) + 1, LENGTH_BUCKET))
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = _FixedStep(self, *key)
        step.load(chunks, held, [c.sequence.slots_for(1)[0] for c in chunks])
        return step.run()[:count]


class _FixedStep:
    """The buffers of one bucket's step, and its graph once captured."""

    def __init__(self, steps: DecodeSteps, rows: int, length: int):
        pool = steps.pool
        device, dtype = pool.k.device, pool.k.dtype
        self.steps, self.rows = steps, rows
        self.embeds = torch.zeros((rows, steps.model.lm.config.hidden_size), dtype=dtype, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        scratch = pool.scratch_page * pool.page_size
        self.write = torch.full((rows,), scratch, dtype=torch.long, device=device)
        int32 = {"dtype": torch.int32, "device": device}
        every_row = torch.arange(rows, **int32)
        self.layout = StepLayout(every_row, torch.ones(rows, **int32), torch.zeros(rows, **int32),
                                 torch.full((rows, length // pool.page_size), pool.scratch_page, **int32),
                                 pool.page_size, 1, length, [(every_row, 1, length)])
        self.graph = self.out = None

    def load(self, chunks, held: list[int], write: list[int]) -> None:
        """Every row of the buffers, the padding rows too: a padding row left from an earlier step
        with more rows would write its old sequence's slot, whoever holds that page now."""
        count, pool, layout = len(chunks), self.steps.pool, self.layout
        pad = self.rows - count
        width = layout.tables.shape[1]
        values = write + [pool.scratch_page * pool.page_size] * pad + held + [0] * pad
        for chunk in chunks:
            table = chunk.sequence.table
            values += table
            values += [pool.scratch_page] * (width - len(table))
        values += [pool.scratch_page] * (width * pad)
        staged = to_device(values, torch.long, self.write.device)  # one copy the host does not wait for
        rows = self.rows
        self.write.copy_(staged[:rows])
        self.layout.held.copy_(staged[rows:2 * rows])
        # A row's next token sits at the position of the count of tokens it holds (`stages._Row.feed`).
        self.positions.copy_(staged[rows:2 * rows])
        self.layout.tables.copy_(staged[2 * rows:].view(rows, width))
        self.embeds[:count].copy_(chunk_embeds(chunks))

    def body(self) -> torch.Tensor:
        pool, layout = self.steps.pool, self.layout
        attention = paged_attention if pool.k.is_cuda else gathered_attention

        def attend_kv(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            pool.k[i].index_copy_(0, self.write, k[0].transpose(0, 1))
            pool.v[i].index_copy_(0, self.write, v[0].transpose(0, 1))
            return attention(q[0].transpose(0, 1), pool.k[i], pool.v[i], layout).transpose(0, 1).unsqueeze(0)

        shape = (pool.heads, pool.kv_heads, pool.head_dim)
        return run_layers(self.steps.model, self.embeds.unsqueeze(0), self.positions.unsqueeze(0), shape,
                          attend_kv)[0]

    def run(self) -> torch.Tensor:
        if not self.steps.capture:
            return self.body()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out.clone()  # the graph's own buffer: the next replay writes it again

    def _capture(self) -> None:
        # One eager step first (lazy set-up, the kernels' compiles); it writes the very slots the
        # replay will, so running it changes nothing.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.body()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.steps.memory):
            self.out = self.body()
        self.steps.memory = self.graph.pool()
