"""The fp8 decode-attention kernel (Triton): one program per (row, head), one query token.

Reads the row's fp8 keys and values (stored as bytes) with their per-column scales in blocks of
BLOCK_N columns and keeps a running softmax (max, denominator, weighted sum) in float32, so each
cache byte is read once. A column counts when it is valid and not after the query's own column;
the own column always counts (as in `static_decoder.forward_at`). Importing this module needs Triton.
"""
import triton
import triton.language as tl


@triton.jit
def fp8_decode_attention_kernel(Q, K, KS, V, VS, VALID, WRITE, OUT,
                                stride_qr, stride_qh, stride_kr, stride_kh, stride_kn, stride_sr, stride_sh,
                                stride_valid, stride_or, stride_oh, n_columns, sm_scale,
                                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + row * stride_qr + head * stride_qh + dims).to(tl.float32) * sm_scale
    write = tl.load(WRITE)
    best = tl.full((), -1.0e30, tl.float32)  # finite: a block with nothing to read must not make NaNs
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((HEAD_DIM,), tl.float32)
    k_base = K + row * stride_kr + head * stride_kh
    v_base = V + row * stride_kr + head * stride_kh
    s_base = row * stride_sr + head * stride_sh
    for start in range(0, n_columns, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inside = cols < n_columns
        valid = tl.load(VALID + row * stride_valid + cols, mask=inside, other=0) != 0
        seen = inside & ((valid & (cols <= write)) | (cols == write))
        offsets = cols[:, None] * stride_kn + dims[None, :]
        k = tl.load(k_base + offsets, mask=inside[:, None], other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        k_scale = tl.load(KS + s_base + cols, mask=inside, other=0.0)
        scores = tl.sum(k * q[None, :], axis=1) * k_scale
        scores = tl.where(seen, scores, -float("inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        weights = tl.exp(scores - new_best)
        shrink = tl.exp(best - new_best)
        v = tl.load(v_base + offsets, mask=inside[:, None], other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        v_scale = tl.load(VS + s_base + cols, mask=inside, other=0.0)
        acc = acc * shrink + tl.sum((weights * v_scale)[:, None] * v, axis=0)
        total = total * shrink + tl.sum(weights, axis=0)
        best = new_best
    out = acc / total
    tl.store(OUT + row * stride_or + head * stride_oh + dims, out.to(OUT.dtype.element_ty))
