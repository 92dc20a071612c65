"""Rows that read part of their context from another row's cache columns: the shared CFG prefix.

Every unconditional CFG row opens with BOS and pad tokens at positions 0, 1, 2, ... (only its
length and its begin-of-image token depend on the prompt), so the keys and values of those columns
are the same in every such row. A decode step reads the KV cache of every row and column, most of
what it costs; with `unconditional_spans` each unconditional row reads them from the longest one's
columns instead (they stay in the GPU's L2 cache while the rows that share them are read), and
conditional rows skip their left padding. In seed and twig modes the text condition is hundreds of
tokens long, so this removes a quarter to a third of the bytes an image step reads.

Spans are int32 [4, rows]: own_start, donor, donor_start, donor_len. Row r attends to columns
donor_start .. donor_start + donor_len - 1 of row `donor` (all of them) and to its own columns from
own_start on (those valid and not after its query). A decode step honours them on a GPU with the
Triton kernel (`decode_kernel.py`); on a CPU it gathers the donor's columns (`emulated_attention`:
twice the reads, the same arithmetic), so the token-exact tests cover the sharing too. Prefills
and injected control tokens attend over each row's own columns, which the prefill also writes.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

OWN_START, DONOR, DONOR_START, DONOR_LEN = range(4)


def no_sharing(spans: torch.Tensor) -> torch.Tensor:
    """Reset `spans` [4, R] in place: every row reads all its own columns and nothing else."""
    spans.zero_()
    spans[DONOR] = torch.arange(spans.shape[1], dtype=spans.dtype, device=spans.device)
    return spans


def unconditional_spans(text_lengths: list[int], width: int) -> torch.Tensor:
    """Spans for `batched.cfg_prefill_inputs`' layout: image b's conditional row 2b and unconditional
    row 2b + 1 hold text_lengths[b] text tokens, left-padded to `width` columns."""
    rows = 2 * len(text_lengths)
    spans = no_sharing(torch.zeros((4, rows), dtype=torch.int32))
    longest = max(range(len(text_lengths)), key=lambda b: text_lengths[b])
    donor_row, donor_first = 2 * longest + 1, width - text_lengths[longest]
    for b, length in enumerate(text_lengths):
        first = width - length  # its BOS column
        spans[OWN_START, 2 * b] = first
        if 2 * b + 1 == donor_row:
            spans[OWN_START, donor_row] = first
            continue
        # BOS and the pads (positions 0 .. length - 2) from the donor; begin-of-image on is its own.
        spans[OWN_START, 2 * b + 1] = width - 1
        spans[DONOR, 2 * b + 1] = donor_row
        spans[DONOR_START, 2 * b + 1] = donor_first
        spans[DONOR_LEN, 2 * b + 1] = length - 1
    return spans


def sharing_enabled(device: torch.device) -> bool:
    """Off a GPU the emulation keeps the sharing under test; on a GPU it needs the kernel.
    TWIG_BATCH_SHARED_PREFIX=0 turns it off (each row then reads all its own columns)."""
    if os.environ.get("TWIG_BATCH_SHARED_PREFIX", "1") == "0":
        return False
    return device.type != "cuda" or kernel() is not None


def attend_over_spans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, write: torch.Tensor,
                     spans: torch.Tensor) -> torch.Tensor:
    """q [R, H, 1, D]; k, v [R, H, A, D] (A columns read); valid [R, A]; `write` the query's column
    (a 0-d device tensor). The attention of each row over its spans, [R, H, 1, D]."""
    if q.device.type != "cuda":
        return emulated_attention(q, k, v, valid, write, spans)
    return kernel_attention(q, k, v, valid, write, spans)


def kernel_attention(q, k, v, valid, write, spans) -> torch.Tensor:
    """`attend_over_spans` by the Triton kernel (on a GPU, or anywhere under TRITON_INTERPRET=1)."""
    return launch_spans_kernel(q, k, v, valid, write, spans, *KERNEL_BLOCK)


# Columns per block and warps per program: the fastest of 32/64/128 x 2/4/8 on an H200 (step_profile).
KERNEL_BLOCK = (64, 4)


def launch_spans_kernel(q, k, v, valid, write, spans, block: int, warps: int) -> torch.Tensor:
    rows, heads, _, head_dim = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    kernel()[(rows, heads)](
        q, k, v, valid, write, spans, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), valid.stride(0), spans.stride(0),
        out.stride(0), out.stride(1), k.shape[2], 1.0 / math.sqrt(head_dim),
        HEAD_DIM=head_dim, BLOCK_N=block, num_warps=warps,
    )
    return out


def emulated_attention(q, k, v, valid, write, spans) -> torch.Tensor:
    """What the kernel computes, with PyTorch ops: the donor's columns gathered in front of the row's own."""
    columns = torch.arange(k.shape[2], device=q.device)
    first, donor, donor_first, donor_len = (s.long() for s in spans.to(q.device))
    own = (columns >= first[:, None]) & ((valid & (columns <= write)) | (columns == write))
    lent = (columns >= donor_first[:, None]) & (columns < (donor_first + donor_len)[:, None])
    keys, values = torch.cat([k[donor], k], dim=2), torch.cat([v[donor], v], dim=2)
    mask = torch.cat([lent, own], dim=1)[:, None, None, :]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


_KERNEL: list = []


def kernel():
    """The Triton kernel, built on first use; None where Triton is missing."""
    if not _KERNEL:
        try:
            from twig_batch.engine.decode_kernel import decode_attention_kernel
        except ImportError:
            decode_attention_kernel = None
        _KERNEL.append(decode_attention_kernel)
    return _KERNEL[0]
