"""The Triton kernel of `paged_attention.paged_attention` (imported only where it runs: Triton
imports here, and nowhere a CPU worker goes).

One program per (sequence of `rows_ptr`, head, block of BLOCK_M queries): it walks the sequence's tokens BLOCK_N at
a time up to the last one its queries see, finding each token's slot through the page table, and keeps
flash-attention's running maximum, normaliser and weighted sum in float32.
"""
import triton
import triton.language as tl


@triton.jit
def paged_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, rows_ptr, table_ptr, held_ptr, count_ptr, start_ptr,
                           q_stride_n, q_stride_h, kv_stride_s, kv_stride_h, out_stride_n, out_stride_h,
                           table_stride, scale, group,
                           PAGE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    row = tl.load(rows_ptr + tl.program_id(0))
    head = tl.program_id(1)
    block = tl.program_id(2)
    count = tl.load(count_ptr + row)
    if block * BLOCK_M < count:
        held = tl.load(held_ptr + row)
        start = tl.load(start_ptr + row)
        kv_head = head // group
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_valid = offs_m < count
        q = tl.load(q_ptr + (start + offs_m)[:, None] * q_stride_n + head * q_stride_h + offs_d[None, :],
                    mask=m_valid[:, None], other=0.0)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        end = held + tl.minimum(count, (block + 1) * BLOCK_M)  # the tokens this block's queries see
        # A loop bound read from the device: the compiler pipelines its loads (num_stages), which it does
        # not across a branch, and a CUDA graph's replay runs each row as far as it reaches now.
        for first in range(0, end, BLOCK_N):
            offs_n = first + tl.arange(0, BLOCK_N)
            n_valid = offs_n < end
            page = tl.load(table_ptr + row * table_stride + offs_n // PAGE, mask=n_valid, other=0)
            slot = (page * PAGE + offs_n % PAGE).to(tl.int64)
            kv_offset = slot[:, None] * kv_stride_s + kv_head * kv_stride_h + offs_d[None, :]
            k = tl.load(k_ptr + kv_offset, mask=n_valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            seen = (offs_n[None, :] <= (held + offs_m)[:, None]) & n_valid[None, :]
            scores = tl.where(seen, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            weights = tl.exp(scores - new_best[:, None])
            keep = tl.exp(best - new_best)
            total = total * keep + tl.sum(weights, 1)
            v = tl.load(v_ptr + kv_offset, mask=n_valid[:, None], other=0.0)
            acc = acc * keep[:, None] + tl.dot(weights.to(v.dtype), v).to(tl.float32)
            best = new_best
        out = acc / total[:, None]
        tl.store(out_ptr + (start + offs_m)[:, None] * out_stride_n + head * out_stride_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None])
