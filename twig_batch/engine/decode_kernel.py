"""The decode-attention kernel (Triton) for a cache in the model's dtype, with borrowed columns.

One program per (row, head), one query token. A row reads two spans of columns, each in blocks of
BLOCK_N with a running softmax (max, denominator, weighted sum) in float32, so each byte is read
once: first `donor_len` columns of another row's cache from `donor_start` (all of them count: they
are the row's own context, stored once for many rows, see `shared_columns.py`), then its own
columns from `own_start`, where a column counts when it is valid and not after the query's own
column, and the own column always counts (as in `static_decoder.forward_at`). Importing this
module needs Triton.
"""
import triton
import triton.language as tl


@triton.jit
def _read_span(q, k_base, v_base, valid_base, first, end, write, stride_kn, best, total, acc,
               CHECK_VALID: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    for start in range(first, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inside = cols < end
        if CHECK_VALID:
            valid = tl.load(valid_base + cols, mask=inside, other=0) != 0
            seen = inside & ((valid & (cols <= write)) | (cols == write))
        else:
            seen = inside
        offsets = cols[:, None] * stride_kn + dims[None, :]
        k = tl.load(k_base + offsets, mask=inside[:, None], other=0.0).to(tl.float32)
        scores = tl.where(seen, tl.sum(k * q[None, :], axis=1), -float("inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        weights = tl.exp(scores - new_best)
        shrink = tl.exp(best - new_best)
        v = tl.load(v_base + offsets, mask=inside[:, None], other=0.0).to(tl.float32)
        acc = acc * shrink + tl.sum(weights[:, None] * v, axis=0)
        total = total * shrink + tl.sum(weights, axis=0)
        best = new_best
    return best, total, acc


@triton.jit
def decode_attention_kernel(Q, K, V, VALID, WRITE, SPANS, OUT,
                            stride_qr, stride_qh, stride_kr, stride_kh, stride_kn, stride_valid, stride_span,
                            stride_or, stride_oh, n_columns, sm_scale,
                            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + row * stride_qr + head * stride_qh + dims).to(tl.float32) * sm_scale
    write = tl.load(WRITE)
    own_start = tl.load(SPANS + row)
    donor = tl.load(SPANS + stride_span + row)
    donor_start = tl.load(SPANS + 2 * stride_span + row)
    donor_len = tl.load(SPANS + 3 * stride_span + row)
    best = tl.full((), -1.0e30, tl.float32)  # finite: a block with nothing to read must not make NaNs
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((HEAD_DIM,), tl.float32)
    donor_k = K + donor.to(tl.int64) * stride_kr + head * stride_kh
    donor_v = V + donor.to(tl.int64) * stride_kr + head * stride_kh
    best, total, acc = _read_span(q, donor_k, donor_v, VALID, donor_start, donor_start + donor_len, write,
                                  stride_kn, best, total, acc, CHECK_VALID=False, HEAD_DIM=HEAD_DIM,
                                  BLOCK_N=BLOCK_N)
    own_k = K + row.to(tl.int64) * stride_kr + head * stride_kh
    own_v = V + row.to(tl.int64) * stride_kr + head * stride_kh
    best, total, acc = _read_span(q, own_k, own_v, VALID + row * stride_valid, own_start, n_columns, write,
                                  stride_kn, best, total, acc, CHECK_VALID=True, HEAD_DIM=HEAD_DIM,
                                  BLOCK_N=BLOCK_N)
    out = acc / total
    tl.store(OUT + row * stride_or + head * stride_oh + dims, out.to(OUT.dtype.element_ty))
