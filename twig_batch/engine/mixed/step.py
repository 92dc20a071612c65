"""One mixed step: every sequence's new tokens (a prefill chunk, or the one token it decodes) in one
pass through the model, whatever each sequence holds already and whatever it is for.

The tokens travel packed, [1, N, D], through the layers' matmuls and norms, so a step costs its real
tokens and nothing for padding. Attention is per sequence: each token's keys and values go to its
sequence's slots in the page pool, then each sequence's queries read its own slots, causal within the
chunk. The attention here gathers every sequence's slots into a padded batch (a plain and readable
form; a paged kernel reads the same slots in place).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twig_batch.engine.forward import run_layers
from twig_batch.engine.fused import FastModel
from twig_batch.engine.mixed.pages import PagedSequence, PagePool


@dataclass
class Chunk:
    """New tokens of one sequence: their input embeddings [T, D] and positions [T]."""
    sequence: PagedSequence
    embeds: torch.Tensor
    positions: torch.Tensor


def mixed_step(model: FastModel, pool: PagePool, chunks: list[Chunk]) -> torch.Tensor:
    """The final-norm hidden state of each chunk's last token, [len(chunks), D]."""
    device = pool.k.device
    counts = [c.embeds.shape[0] for c in chunks]
    held = [c.sequence.length for c in chunks]  # tokens each sequence holds before this step
    write = torch.tensor([s for c, n in zip(chunks, counts) for s in c.sequence.slots_for(n)], device=device)
    reads = _AttentionReads(chunks, counts, held, device)
    embeds = torch.cat([c.embeds for c in chunks]).unsqueeze(0)
    positions = torch.cat([c.positions for c in chunks]).to(device).unsqueeze(0)

    def attend_kv(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [1, H, N, d]; k, v [1, KVH, N, d] -> this layer's slots, then each sequence reads its own.
        pool.k[i].index_copy_(0, write, k[0].transpose(0, 1))
        pool.v[i].index_copy_(0, write, v[0].transpose(0, 1))
        return reads.attend(q, pool.k[i], pool.v[i], pool.kv_heads != pool.heads)

    hidden = run_layers(model, embeds, positions, (pool.heads, pool.kv_heads, pool.head_dim), attend_kv)[0]
    last = torch.tensor(counts, device=device).cumsum(0) - 1
    return hidden[last]


class _AttentionReads:
    """Where each sequence's queries sit in the packed tokens and which slots they read: R sequences,
    their chunks padded to T columns of queries and their slots to L columns of keys."""

    def __init__(self, chunks: list[Chunk], counts: list[int], held: list[int], device):
        rows, width, length = len(chunks), max(counts), max(h + n for h, n in zip(held, counts))
        starts = [0]
        for n in counts[:-1]:
            starts.append(starts[-1] + n)
        query = torch.zeros((rows, width), dtype=torch.long)
        slots = torch.zeros((rows, length), dtype=torch.long)
        mask = torch.zeros((rows, 1, width, length), dtype=torch.bool)
        columns = torch.arange(length)
        for r, (chunk, n, h, first) in enumerate(zip(chunks, counts, held, starts)):
            query[r, :n] = first + torch.arange(n)
            own = chunk.sequence.slots()
            slots[r, :len(own)] = torch.tensor(own)
            # Query t (the sequence's token h + t) sees its sequence's tokens up to itself; a padding
            # query sees them all (its output is never read, but it must not be all masked: NaN).
            upto = (h + torch.arange(width)).clamp(max=h + n - 1)
            mask[r, 0] = columns.unsqueeze(0) <= upto.unsqueeze(1)
        self.query, self.slots, self.mask = query.to(device), slots.to(device), mask.to(device)
        self.packed = torch.cat([r * width + torch.arange(n) for r, n in enumerate(counts)]).to(device)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gqa: bool) -> torch.Tensor:
        rows, width = self.query.shape
        heads, dim = q.shape[1], q.shape[3]
        queries = q[0][:, self.query].transpose(0, 1)  # [R, H, T, d]
        k = keys[self.slots].permute(0, 2, 1, 3)  # [R, KVH, L, d]
        v = values[self.slots].permute(0, 2, 1, 3)
        out = F.scaled_dot_product_attention(queries, k, v, attn_mask=self.mask, enable_gqa=gqa)
        return out.transpose(0, 1).reshape(heads, rows * width, dim)[:, self.packed].unsqueeze(0)
