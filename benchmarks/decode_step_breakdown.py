"""Where one decode step's time goes: the parts of a 7B-sized step timed alone on the GPU.

Usage: python benchmarks/decode_step_breakdown.py --out DIR [--rows 256] [--width 384]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_common import cuda_ms
from twig_batch.engine.fused import Kernels
from twig_batch.engine.sampling import guided_logits, sample_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--width", type=int, default=384)
    args = parser.parse_args()
    r, a, layers, heads, hd, d, ff = args.rows, args.width, 30, 32, 128, 4096, 11008
    bf = dict(dtype=torch.bfloat16, device="cuda")
    q = torch.randn(r, heads, 1, hd, **bf)
    k = torch.randn(r, heads, a, hd, **bf)
    v = torch.randn(r, heads, a, hd, **bf)
    mask = torch.ones(r, 1, 1, a, dtype=torch.bool, device="cuda")
    mask[:, :, :, :10] = False
    bias = torch.zeros(r, 1, 1, a, **bf).masked_fill(~mask, float("-inf"))
    x = torch.randn(r, d, **bf)
    w_qkv, w_o = torch.randn(3 * d, d, **bf), torch.randn(d, d, **bf)
    w_up, w_down = torch.randn(2 * ff, d, **bf), torch.randn(d, ff, **bf)
    logits = torch.randn(r, 16384, **bf)
    seeds = torch.arange(r // 2, device="cuda")
    kernels = Kernels()  # sampling compiled, as an engine's is

    def manual():
        s = (q @ k.transpose(-1, -2)) * hd**-0.5
        p = torch.softmax(s.float().masked_fill(~mask, float("-inf")), -1).to(q.dtype)
        return p @ v

    result = {
        "rows": r, "attend_width": a,
        "attention_sdpa_bool_mask_ms_x30": layers * cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
        "attention_sdpa_bias_ms_x30": layers * cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)),
        "attention_sdpa_no_mask_ms_x30": layers * cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v)),
        "attention_matmul_ms_x30": layers * cuda_ms(manual),
        "linear_layers_ms_x30": layers * cuda_ms(lambda: (F.linear(x, w_qkv), F.linear(x, w_o), F.linear(
            F.linear(x, w_up)[:, :ff], w_down))),
        "kv_bytes_gb": 2 * layers * r * a * heads * hd * 2 / 1e9,
        "sampling_ms": cuda_ms(lambda: sample_tokens(guided_logits(logits, 5.0), seeds, 7, 1.0,
                                                             kernels=kernels)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_step_breakdown.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
