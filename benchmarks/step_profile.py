"""Where a warm decode step spends its time, and what the attention kernels cost alone.

Usage: python benchmarks/step_profile.py --out DIR [--rows 256]
On a random Janus-Pro-7B-sized model (bf16): the CUDA-graph image step at several cache widths, the
text step with sampling at the seed workload's shape, the top kernels of one profiled image step,
and attention alone (cuDNN over the bf16 cache, with and without the mask; the fp8 kernel at a few
block sizes). Writes DIR/step_profile.json and DIR/step_profile_kernels.txt.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_common import cuda_ms
from twig_batch.engine.fp8_kv import quantize
from twig_batch.engine.fp8_triton import fp8_decode_attention_kernel
from twig_batch.engine.fused import FastModel
from twig_batch.engine.graphs import GraphedDecodeStep
from twig_batch.engine.sampling import guided_logits, sample_tokens
from twig_batch.engine.static_decoder import StaticKVCache, forward_static
from twig_batch.engine.runner import Engine
from twig_batch.model import load_janus
from twig_batch.seeds import STREAM_TEXT


def filled_cache(model: FastModel, rows: int, columns: int, embed, kind: str):
    """A cache with `columns` columns written (random prompt embeddings), and its graphed step."""
    lm = model.lm
    cache = StaticKVCache(lm, rows, columns + 64)
    embeds = torch.randn(rows, columns, lm.config.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02
    positions = torch.arange(columns, device="cuda").expand(rows, columns)
    forward_static(model, cache, embeds, positions, torch.ones(rows, columns, dtype=torch.bool, device="cuda"))
    return cache, GraphedDecodeStep(model, cache, embed, kind), positions[:, -1:] + 1


def image_steps(bundle, model: FastModel, rows: int) -> dict:
    out = {}
    tokens = torch.zeros(rows, dtype=torch.long, device="cuda")
    for width in (128, 384, 640):
        cache, step, positions = filled_cache(model, rows, width, bundle.embed_image_codes, "image")

        def one():
            cache.used = width
            step(tokens, positions)
        out[f"image_step_ms_at_{width}"] = cuda_ms(one)
        hidden = step(tokens, positions)
        seeds = torch.arange(rows // 2, device="cuda")
        out[f"image_sampling_ms_at_{width}"] = cuda_ms(
            lambda: sample_tokens(guided_logits(bundle.image_logits(hidden), 5.0), seeds, 7, 1.0,
                                  kernels=model.kernels))
        if width == 384:
            out["image_step_profile"] = profile(one)
        del cache, step, one, hidden  # the next width borrows the KV arena
    return out


def text_step(bundle, model: FastModel, rows: int = 384, width: int = 250) -> dict:
    cache, step, positions = filled_cache(model, rows, width, bundle.embed_text, "text")
    tokens = torch.zeros(rows, dtype=torch.long, device="cuda")

    def one():
        cache.used = width
        step(tokens, positions)
    hidden = step(tokens, positions)
    seeds = torch.arange(rows, device="cuda")
    return {"text_rows": rows, "text_width": width, "text_step_ms": cuda_ms(one),
            "text_logits_ms": cuda_ms(lambda: bundle.text_logits(hidden)),
            "text_sampling_ms": cuda_ms(lambda: sample_tokens(bundle.text_logits(hidden), seeds, 3, 1.0,
                                                              stream=STREAM_TEXT, kernels=model.kernels))}


def profile(fn) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)


def attention_alone(rows: int, width: int = 384, heads: int = 32, head_dim: int = 128) -> dict:
    q = torch.randn(rows, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(rows, heads, width, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.ones(rows, 1, 1, width, dtype=torch.bool, device="cuda")
    out = {"attention_width": width,
           "sdpa_bf16_masked_ms": cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
           "sdpa_bf16_unmasked_ms": cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v)),
           "kv_read_floor_bf16_ms": 2 * k.numel() * 2 / 4.25e12 * 1e3}
    k8, ks = quantize(k)
    v8, vs = quantize(v)
    valid = torch.ones(rows, width, dtype=torch.bool, device="cuda")
    write = torch.tensor(width - 1, device="cuda")
    result = torch.empty_like(q)
    for block in (32, 64, 128):
        for warps in (2, 4, 8):
            def run():
                fp8_decode_attention_kernel[(rows, heads)](
                    q, k8.view(torch.uint8), ks, v8.view(torch.uint8), vs, valid, write, result,
                    q.stride(0), q.stride(1), k8.stride(0), k8.stride(1), k8.stride(2), ks.stride(0), ks.stride(1),
                    valid.stride(0), result.stride(0), result.stride(1), width, 1 / math.sqrt(head_dim),
                    HEAD_DIM=head_dim, BLOCK_N=block, num_warps=warps)
            out[f"fp8_kernel_ms_block{block}_warps{warps}"] = cuda_ms(run)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = load_janus("random-7b", "cuda", torch.bfloat16)
    model = Engine(bundle, use_graphs=True).model  # joined projections, kernels compiled as a worker's are
    with torch.no_grad():
        report = attention_alone(args.rows) | image_steps(bundle, model, args.rows) | text_step(bundle, model)
    (args.out / "step_profile_kernels.txt").write_text(report.pop("image_step_profile"))
    (args.out / "step_profile.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
