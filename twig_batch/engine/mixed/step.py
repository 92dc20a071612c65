"""One mixed step: every sequence's new tokens (a prefill chunk, or the one token it decodes) in one
pass through the model, whatever each sequence holds already and whatever it is for.

The tokens travel packed, [1, N, D], through the layers' matmuls and norms, so a step costs its real
tokens and nothing for padding. Attention is per sequence: each token's keys and values go to its
sequence's slots in the page pool, then each sequence's queries read its own slots, causal within the
chunk (`paged_attention.py`: in place on a GPU, gathered elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from twig_batch.engine.forward import run_layers
from twig_batch.engine.fused import FastModel
from twig_batch.engine.mixed.pages import PagedSequence, PagePool
from twig_batch.engine.transfer import to_device
from twig_batch.engine.mixed.paged_attention import StepLayout, gathered_attention, paged_attention


@dataclass
class Chunk:
    """New tokens of one sequence: `count` of them, whose input embeddings are rows `first` .. of
    `source` [n, D]. A decoding row's one token is a row of the embeddings its step drew for all
    rows at once, so a step makes no tensor per row. Its tokens go at the positions that follow what
    the sequence holds."""
    sequence: PagedSequence
    source: torch.Tensor
    first: int
    count: int


def gather_rows(parts: list[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
    """Rows `first` .. `first + count` of each (source, first, count), in order, in one gather."""
    sources: list[torch.Tensor] = []
    base: dict[int, int] = {}  # source -> where its rows start among all sources' rows
    index: list[int] = []
    rows = 0
    for source, first, count in parts:
        start = base.get(id(source))
        if start is None:
            start = base[id(source)] = rows
            sources.append(source)
            rows += source.shape[0]
        index.extend(range(start + first, start + first + count))
    bank = sources[0] if len(sources) == 1 else torch.cat(sources)
    return bank[to_device(index, torch.long, bank.device)]


def chunk_embeds(chunks: list[Chunk]) -> torch.Tensor:
    """[sum of counts, D]: every chunk's input embeddings, in order."""
    return gather_rows([(c.source, c.first, c.count) for c in chunks])


def mixed_step(model: FastModel, pool: PagePool, chunks: list[Chunk], attention=None) -> torch.Tensor:
    """The final-norm hidden state of each chunk's last token, [len(chunks), D]. `attention`:
    `paged_attention` or `gathered_attention` (None: the first on a GPU, the second elsewhere)."""
    device = pool.k.device
    if attention is None:
        attention = paged_attention if device.type == "cuda" else gathered_attention
    counts = [c.count for c in chunks]
    held = [c.sequence.length for c in chunks]  # tokens each sequence holds before this step
    write = [s for c, n in zip(chunks, counts) for s in c.sequence.slots_for(n)]
    positions = [h + j for h, n in zip(held, counts) for j in range(n)]  # a token's position: what precedes it
    staged = to_device(write + positions, torch.long, device)
    write, positions = staged[:len(write)], staged[len(write):].unsqueeze(0)
    layout = StepLayout.build(counts, held, [c.sequence.table for c in chunks], pool.page_size, device)
    embeds = chunk_embeds(chunks).unsqueeze(0)

    def attend_kv(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [1, H, N, d]; k, v [1, KVH, N, d] -> this layer's slots, then each sequence reads its own.
        pool.k[i].index_copy_(0, write, k[0].transpose(0, 1))
        pool.v[i].index_copy_(0, write, v[0].transpose(0, 1))
        return attention(q[0].transpose(0, 1), pool.k[i], pool.v[i], layout).transpose(0, 1).unsqueeze(0)

    hidden = run_layers(model, embeds, positions, (pool.heads, pool.kv_heads, pool.head_dim), attend_kv)[0]
    last = to_device(torch.tensor(counts).cumsum(0) - 1, torch.long, device)
    return hidden[last]
