"""The shared CFG prefix: span layout, the emulation against plain attention, and the decode kernel."""
import os

import pytest
import torch
import torch.nn.functional as F

from twig_batch.engine.shared_columns import (DONOR, DONOR_LEN, DONOR_START, OWN_START, emulated_attention,
                                              unconditional_spans)
from twig_batch.engine.static_decoder import StaticKVCache


def test_unconditional_rows_borrow_bos_and_pads_from_the_longest_and_cond_rows_skip_padding():
    spans = unconditional_spans([4, 6, 2], width=6)  # rows c0 u0 c1 u1 c2 u2; u1 is the longest
    assert spans[OWN_START].tolist() == [2, 5, 0, 0, 4, 5]
    assert spans[DONOR].tolist() == [0, 3, 2, 3, 4, 3]
    assert spans[DONOR_START].tolist() == [0, 0, 0, 0, 0, 0]
    assert spans[DONOR_LEN].tolist() == [0, 3, 0, 0, 0, 1]  # positions 0..L-2 from u1's columns 0..L-2


def _cfg_cache(lengths, width, extra, heads=2, dim=8, seed=0):
    """K/V as a CFG prefill would leave them: unconditional rows equal wherever their tokens are (BOS, pads)."""
    g = torch.Generator().manual_seed(seed)
    rows, columns = 2 * len(lengths), width + extra
    k = torch.randn(rows, heads, columns, dim, generator=g, dtype=torch.float64)
    v = torch.randn(rows, heads, columns, dim, generator=g, dtype=torch.float64)
    pad_k = torch.randn(heads, width, dim, generator=g, dtype=torch.float64)  # K/V at positions 0, 1, ...
    pad_v = torch.randn(heads, width, dim, generator=g, dtype=torch.float64)
    valid = torch.ones(rows, columns, dtype=torch.bool)
    for b, length in enumerate(lengths):
        first = width - length
        valid[2 * b:2 * b + 2, :first] = False
        k[2 * b + 1, :, first:width - 1] = pad_k[:, :length - 1]
        v[2 * b + 1, :, first:width - 1] = pad_v[:, :length - 1]
        k[2 * b:2 * b + 2, :, :first] = 1e3  # left padding holds anything: it must never be read
    return k, v, valid


def test_reading_the_shared_columns_equals_reading_each_rows_own():
    lengths, width, extra = [4, 7, 2], 7, 5
    k, v, valid = _cfg_cache(lengths, width, extra)
    valid[0, width + 1] = valid[3, width + 2] = False  # control-token slots of images not injected
    rows, write = k.shape[0], torch.tensor(width + extra - 1)
    q = torch.randn(rows, k.shape[1], 1, k.shape[3], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    columns = torch.arange(k.shape[2])
    mask = ((valid & (columns <= write)) | (columns == write))[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    shared = emulated_attention(q, k, v, valid, write, unconditional_spans(lengths, width))
    assert torch.allclose(shared, expected, atol=1e-12)
    k[1, :, width - 4:width - 1] += 1  # a borrowing row's own copy of the pads is not what it reads
    assert torch.allclose(emulated_attention(q, k, v, valid, write, unconditional_spans(lengths, width)), expected,
                          atol=1e-12)


def test_rows_that_share_columns_cannot_be_dropped(tiny64):
    cache = StaticKVCache(tiny64.language_model, rows=4, max_len=8)
    cache.share_columns(unconditional_spans([3, 2], width=3))
    with pytest.raises(RuntimeError, match="share columns"):
        cache.keep_rows(torch.tensor([0, 1]))
    cache.close()


def test_the_kernel_equals_the_emulation():
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs a GPU, or Triton's interpreter (TRITON_INTERPRET=1)")
    from twig_batch.engine.shared_columns import kernel_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths, width, extra = [70, 3, 90, 40], 90, 50  # spans crossing the kernel's 64-column blocks
    k, v, valid = (t.to(device) for t in _cfg_cache(lengths, width, extra, dim=16))
    k, v = k.float(), v.float()
    valid[2, width + 3] = valid[5, width - 1 + extra] = False  # the query's own column counts regardless
    rows, write = k.shape[0], torch.tensor(width + extra - 1, device=device)
    q = torch.randn(rows, k.shape[1], 1, k.shape[3], generator=torch.Generator().manual_seed(2)).to(device)
    spans = unconditional_spans(lengths, width).to(device)
    got = kernel_attention(q, k, v, valid, write, spans)
    assert torch.allclose(got, emulated_attention(q, k, v, valid, write, spans), atol=1e-5, rtol=1e-4)
