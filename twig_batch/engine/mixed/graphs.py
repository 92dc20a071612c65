"""The mixed loop's steps of equal chunks at fixed shapes, replayed as CUDA graphs on a GPU.

A step in which every row feeds the same number of tokens T (every row decoding, T = 1: most of a
run's steps; or the controller's redo of injected rows, T = its control tokens and the token after
them) is laid out in fixed-shape buffers: its rows rounded up to a multiple of ROW_BUCKET (the extra
rows pad: they write the pool's scratch page and read only it) and its longest row to a multiple of
`paged_attention.LENGTH_BUCKET`. Each (T, rows, length) bucket is captured once per loop as a CUDA
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
    """Steps of equal chunks over `pool` by (tokens per row, rows, length) bucket; `capture`: as CUDA graphs."""

    def __init__(self, model: FastModel, pool: PagePool, capture: bool):
        self.model, self.pool, self.capture = model, pool, capture
        self.steps: dict[tuple[int, int, int], _FixedStep] = {}
        self.memory = None  # the graphs' shared memory pool

    def __call__(self, chunks) -> torch.Tensor:
        """The hidden states [len(chunks), D] after feeding each chunk's tokens (as many for each),
        at each chunk's last token."""
        count, tokens = len(chunks), chunks[0].count
        if any(c.count != tokens for c in chunks):
            raise ValueError(f"a fixed-shape step feeds as many tokens for every row, got {[c.count for c in chunks]}")
        held = [c.sequence.length for c in chunks]
        key = (tokens, bucket(count, ROW_BUCKET), bucket(max(held) + tokens, LENGTH_BUCKET))
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = _FixedStep(self, *key)
        step.load(chunks, held, [slot for c in chunks for slot in c.sequence.slots_for(tokens)])
        return step.run()[:count]


class _FixedStep:
    """The buffers of one bucket's step, and its graph once captured."""

    def __init__(self, steps: DecodeSteps, tokens: int, rows: int, length: int):
        pool = steps.pool
        device, dtype = pool.k.device, pool.k.dtype
        self.steps, self.tokens, self.rows = steps, tokens, rows
        fed = rows * tokens
        self.embeds = torch.zeros((fed, steps.model.lm.config.hidden_size), dtype=dtype, device=device)
        self.positions = torch.zeros(fed, dtype=torch.long, device=device)
        scratch = pool.scratch_page * pool.page_size
        self.write = torch.full((fed,), scratch, dtype=torch.long, device=device)
        int32 = {"dtype": torch.int32, "device": device}
        every_row = torch.arange(rows, **int32)
        self.layout = StepLayout(every_row * tokens, torch.full((rows,), tokens, **int32), torch.zeros(rows, **int32),
                                 torch.full((rows, length // pool.page_size), pool.scratch_page, **int32),
                                 pool.page_size, tokens, length, [(every_row, tokens)])
        self.graph = self.out = None

    def load(self, chunks, held: list[int], write: list[int]) -> None:
        """Every row of the buffers, the padding rows too: a padding row left from an earlier step
        with more rows would write its old sequence's slot, whoever holds that page now."""
        count, pool, layout, tokens = len(chunks), self.steps.pool, self.layout, self.tokens
        pad, rows = self.rows - count, self.rows
        fed = rows * tokens
        width = layout.tables.shape[1]
        # A row's new tokens sit at the positions that follow what it holds (`stages._Row.feed`).
        positions = [h + j for h in held for j in range(tokens)]
        values = write + [pool.scratch_page * pool.page_size] * (pad * tokens) + positions + [0] * (pad * tokens)
        values += held + [0] * pad
        for chunk in chunks:
            table = chunk.sequence.table
            values += table
            values += [pool.scratch_page] * (width - len(table))
        values += [pool.scratch_page] * (width * pad)
        staged = to_device(values, torch.long, self.write.device)  # one copy the host does not wait for
        self.write.copy_(staged[:fed])
        self.positions.copy_(staged[fed:2 * fed])
        self.layout.held.copy_(staged[2 * fed:2 * fed + rows])
        self.layout.tables.copy_(staged[2 * fed + rows:].view(rows, width))
        self.embeds[:count * tokens].copy_(chunk_embeds(chunks))

    def body(self) -> torch.Tensor:
        pool, layout = self.steps.pool, self.layout
        attention = paged_attention if pool.k.is_cuda else gathered_attention

        def attend_kv(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            pool.k[i].index_copy_(0, self.write, k[0].transpose(0, 1))
            pool.v[i].index_copy_(0, self.write, v[0].transpose(0, 1))
            return attention(q[0].transpose(0, 1), pool.k[i], pool.v[i], layout).transpose(0, 1).unsqueeze(0)

        shape = (pool.heads, pool.kv_heads, pool.head_dim)
        hidden = run_layers(self.steps.model, self.embeds.unsqueeze(0), self.positions.unsqueeze(0), shape,
                            attend_kv)[0]
        return hidden[self.tokens - 1::self.tokens]  # each row's last token

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
