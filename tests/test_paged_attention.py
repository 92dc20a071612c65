"""Attention over the page pool: the Triton kernel (in Triton's interpreter here, compiled on a GPU)
against the gathered form, and the gathered form against a plain causal attention per sequence."""
import os

import pytest
import torch
import torch.nn.functional as F

from twig_batch.engine.mixed.paged_attention import StepLayout, gathered_attention

HEADS, KV_HEADS, DIM, PAGE = 4, 2, 16, 4
COUNTS = [1, 5, 17, 140, 1]  # decoding rows and prefill chunks of several sizes
HELD = [9, 3, 30, 0, 70]  # tokens each sequence held before the step


def step_case(seed=0, counts=COUNTS, held=HELD):
    """A pool whose pages are handed out shuffled, sequences of `counts` new tokens after `held` ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = [h + n for h, n in zip(held, counts)]
    pages_needed = [-(-n // PAGE) for n in lengths]
    order = torch.randperm(sum(pages_needed) + 3, generator=g).tolist()
    tables, first = [], 0
    for n in pages_needed:
        tables.append(order[first:first + n])
        first += n
    slots = (sum(pages_needed) + 3) * PAGE
    keys = torch.randn(slots, KV_HEADS, DIM, generator=g)
    values = torch.randn(slots, KV_HEADS, DIM, generator=g)
    q = torch.randn(sum(counts), HEADS, DIM, generator=g)
    return q, keys, values, StepLayout.build(counts, held, tables, PAGE, "cpu"), tables


def test_gathered_attention_is_causal_attention_over_each_sequence_alone():
    q, keys, values, layout, tables = step_case()
    out = gathered_attention(q, keys, values, layout)
    first = 0
    for table, held, count in zip(tables, HELD, COUNTS):
        slots = [table[j // PAGE] * PAGE + j % PAGE for j in range(held + count)]
        k = keys[slots].transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, 0)  # [H, L, d]
        v = values[slots].transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, 0)
        mine = q[first:first + count].transpose(0, 1)  # [H, T, d]
        seen = torch.arange(held + count).unsqueeze(0) <= (held + torch.arange(count)).unsqueeze(1)
        want = F.scaled_dot_product_attention(mine, k, v, attn_mask=seen).transpose(0, 1)
        torch.testing.assert_close(out[first:first + count], want)
        first += count


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="a GPU runs the kernel itself")
def test_the_kernel_reads_the_pages_in_place_as_the_gathered_form_does():
    pytest.importorskip("triton")
    from twig_batch.engine.mixed.paged_attention import paged_attention

    # Steps with prefill chunks, a step of decoding rows alone (the kernel's smaller blocks), and one of
    # short chunks that fit those blocks (the controller's redo of injected rows).
    for seed, counts, held in ((0, COUNTS, HELD), (1, COUNTS, HELD), (2, [1, 1, 1], [9, 0, 70]),
                               (3, [5, 3, 5], [9, 0, 70])):
        q, keys, values, layout, _ = step_case(seed, counts, held)
        torch.testing.assert_close(paged_attention(q, keys, values, layout),
                                   gathered_attention(q, keys, values, layout), rtol=1e-4, atol=1e-5)
