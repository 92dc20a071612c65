"""Attention over the page pool: every sequence's queries against its own pages, in place.

`StepLayout` is what one mixed step's attention needs to know of its sequences, built once per step
and read by every layer: where each sequence's new tokens sit among the packed tokens, how many it
held before, and its page table. Two ways to attend read the same layout and give the same result:
- `gathered_attention`: each sequence's keys and values gathered into a padded batch and a plain
  scaled-dot-product attention (any device and dtype; what the CPU runs);
- `paged_attention`: a Triton kernel (flash-attention's online softmax) that reads each sequence's
  pages where they are, one program per (sequence, head, block of queries): what a GPU runs, with no
  copy of the cache and no padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twig_batch.engine.transfer import to_device

LENGTH_BUCKET = 512  # a CUDA graph's page tables hold its step's longest sequence rounded up to this


@dataclass(frozen=True)
class Launch:
    """How the kernel runs over a set of rows: queries and keys per iteration of a program, and
    Triton's warps per program and pipeline stages of its loads."""
    block_m: int
    block_n: int
    warps: int
    stages: int


# A decoding row has one query, so its launch takes the smallest block `tl.dot` allows; prefill chunks
# take larger blocks, each of which reads its sequence's keys and values once for all its queries.
# The fastest on average over `benchmarks/paged_kernel_probe.py`'s cases on an H200: decoding rows at
# 0.96-1.01 of the copy-rate floor, prefill chunks at 2.3-4.2 times their floor.
DECODE_LAUNCH = Launch(block_m=16, block_n=128, warps=4, stages=2)
PREFILL_LAUNCH = Launch(block_m=64, block_n=32, warps=4, stages=2)

@dataclass
class StepLayout:
    """R sequences in one step: `starts`, `counts` [R] their new tokens among the packed ones,
    `held` [R] the tokens each held before, `tables` [R, most pages] their page tables (device
    tensors, int32), `page_size`; `width`, `length`: the most new tokens and the most tokens of any.
    `parts`: the kernel's launches, (rows [r] on the device, int32; their most new tokens) each: the
    decoding rows apart from the prefill chunks, so that a row of one query is not run in blocks sized
    for the longest chunk of the step."""
    starts: torch.Tensor
    counts: torch.Tensor
    held: torch.Tensor
    tables: torch.Tensor
    page_size: int
    width: int
    length: int
    parts: list[tuple[torch.Tensor, int]]

    @classmethod
    def build(cls, counts: list[int], held: list[int], tables: list[list[int]], page_size: int, device) -> "StepLayout":
        starts = [0]
        for n in counts[:-1]:
            starts.append(starts[-1] + n)
        most = max(len(t) for t in tables)
        padded = [t + [0] * (most - len(t)) for t in tables]

        decoding = [i for i, n in enumerate(counts) if n == 1]
        chunked = [i for i, n in enumerate(counts) if n > 1]
        staged = to_device(starts + counts + held + decoding + chunked + [v for t in padded for v in t],
                           torch.int32, device)  # one copy
        r = len(counts)
        order, tables = staged[3 * r:4 * r], staged[4 * r:].view(r, most)
        parts = []
        for first, rows in ((0, decoding), (len(decoding), chunked)):
            if rows:
                parts.append((order[first:first + len(rows)], max(counts[i] for i in rows)))
        return cls(staged[:r], staged[r:2 * r], staged[2 * r:3 * r], tables, page_size, max(counts),
                   max(h + n for h, n in zip(held, counts)), parts)


def gathered_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: StepLayout) -> torch.Tensor:
    """q [N, H, d] packed; keys, values [slots, KVH, d] -> [N, H, d]."""
    device = q.device
    rows, width, length = layout.counts.shape[0], layout.width, layout.length
    counts, held, starts = (t.long() for t in (layout.counts, layout.held, layout.starts))
    t = torch.arange(width, device=device)
    j = torch.arange(length, device=device)
    query = (starts.unsqueeze(1) + t).clamp(max=q.shape[0] - 1)  # [R, T]; padding queries repeat a real one
    page_index = (j // layout.page_size).clamp(max=layout.tables.shape[1] - 1)
    page = layout.tables.long().gather(1, page_index.unsqueeze(0).expand(rows, -1))
    slots = page * layout.page_size + j % layout.page_size  # [R, L]
    # Query t of a sequence (its token held + t) sees the sequence's tokens up to itself; a padding
    # query sees all of them (its output is dropped, but an all-masked row would be NaN).
    upto = torch.minimum(held.unsqueeze(1) + t, (held + counts - 1).unsqueeze(1))  # [R, T]
    mask = (j.view(1, 1, -1) <= upto.unsqueeze(-1)).unsqueeze(1)  # [R, 1, T, L]
    queries = q[query].transpose(1, 2)  # [R, H, T, d]
    k, v = keys[slots].transpose(1, 2), values[slots].transpose(1, 2)  # [R, KVH, L, d]
    out = F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    real = (t.unsqueeze(0) < counts.unsqueeze(1))  # [R, T]
    return out.transpose(1, 2)[real]  # packed order: sequence by sequence, token by token


def paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: StepLayout,
                    decode: Launch = DECODE_LAUNCH, prefill: Launch = PREFILL_LAUNCH) -> torch.Tensor:
    """`gathered_attention`'s result, read in place by the Triton kernel: the decoding rows in one
    launch (`decode`), the prefill chunks in another (`prefill`)."""
    import triton

    from twig_batch.engine.mixed.paged_kernel import paged_attention_kernel

    heads, dim = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for rows, width in layout.parts:
        launch = decode if width <= decode.block_m else prefill
        grid = (rows.shape[0], heads, triton.cdiv(width, launch.block_m))
        paged_attention_kernel[grid](
            q, keys, values, out, rows, layout.tables, layout.held, layout.counts, layout.starts,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1),
            layout.tables.stride(0), dim ** -0.5, heads // keys.shape[1],
            PAGE=layout.page_size, D=dim, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
            num_warps=launch.warps, num_stages=launch.stages)
    return out
