"""The three workloads of BENCHMARK.md and their anchors, in one run on one GPU.

Usage: python benchmarks/speed_suite.py --out DIR [--images 128] [--native-images 128] [--size 7b] [--skip-unfused]
Model: Janus-Pro-7B-sized, random weights, bf16, bf16 KV cache. Writes DIR/speed_suite.json and
DIR/speed_suite.md (the table), and prints the table. In order: device anchors (copy, matmul), the
seed-style loop, transformers' native `generate`, the bf16 checks against the reference loop, plain
with the unfused decode step (for comparison), then plain (at --images and at the batch chosen from
free memory), twig and seed with the default engine and a per-phase breakdown, plain with an fp8 KV
cache, and last twig and seed at the batch chosen from free memory.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench_common import (device_anchors, native_generate_anchor, oom_record, plain_workload, prompts_of_length,
                          run_staged, seed_style_anchor, start_fresh, workload_settings)
from bf16_checks import distribution_check, graph_vs_eager, greedy_agreement
from twig_batch.engine.runner import Engine
from twig_batch.engine.memory import free_device_bytes
from twig_batch.pipeline.sequences import images_per_call
from twig_batch.model import load_janus
from twig_batch.settings import GenerationSettings

TARGETS = {"plain": 16.0, "twig": 3.5, "seed": 6.0}


def step(result: dict, out: Path, name: str, value: dict | list) -> None:
    """Record one part and write everything so far: a run cut short still leaves its figures."""
    if isinstance(value, list):
        result.setdefault(name, []).extend(value)
    else:
        result.update(value)
    start_fresh()
    (out / "speed_suite.json").write_text(json.dumps(result, indent=2))
    print(name, json.dumps(value)[:600], flush=True)


def fp8_kernel_check(rows: int = 256, heads: int = 32, columns: int = 400, head_dim: int = 128) -> dict:
    """The fp8 decode-attention kernel against the dequantizing reference, at a 7B step's shape."""
    from twig_batch.engine.fp8_kv import decode_attention, quantize, reference_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(rows, heads, 1, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    k8, k_scale = quantize(torch.randn(rows, heads, columns, head_dim, device="cuda", generator=g) * 4)
    v8, v_scale = quantize(torch.randn(rows, heads, columns, head_dim, device="cuda", generator=g))
    valid = torch.rand(rows, columns, device="cuda", generator=g) > 0.2
    write = torch.tensor(columns - 30, device="cuda")
    cols = torch.arange(columns, device="cuda")
    mask = ((valid & (cols <= write)) | (cols == write))[:, None, None, :]
    out = decode_attention(q, k8, k_scale, v8, v_scale, valid, write, mask)
    expected = reference_attention(q, k8, k_scale, v8, v_scale, mask)
    return {"fp8_kernel_max_abs_diff": (out.float() - expected.float()).abs().max().item(),
            "fp8_kernel_mean_abs_output": expected.float().abs().mean().item()}


def workload(result: dict, out: Path, name: str, run) -> None:
    """One row of the table; an out-of-memory error is recorded on the row and the suite goes on."""
    try:
        row = run()
    except torch.OutOfMemoryError as exc:
        row = oom_record(exc)
    step(result, out, "workloads", [{"name": name, **row}])
    (out / "speed_suite.md").write_text(table(result) + "\n")  # the table so far, like the JSON


def table(result: dict) -> str:
    lines = ["| workload | images | images/s | first batch images/s | ms/step | peak GiB | target | vs native generate "
             "| vs seed-style |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    native = result.get("native_img_s") or 6.11  # BENCHMARK.md's figure when the local release fails
    seed_style = 1 / result["seed_style_s_per_image_576"]
    for row in result["workloads"]:
        name = row["name"]
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:60]} | | | | | | | |")
            continue
        step = f"{row['ms_per_step']:.1f}" if "ms_per_step" in row else "-"
        target = TARGETS.get(name.split()[0].rstrip(","), "")
        cold = f"{row['cold_img_s']:.2f}" if "cold_img_s" in row else "-"
        lines.append(f"| {name} | {row['images']} | {row['img_s']:.2f} | {cold} | {step} | {row['peak_gib']:.1f} | {target} | "
                     f"{row['img_s'] / native:.2f}x | {row['img_s'] / seed_style:.0f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--native-images", type=int, default=128, help="images of transformers' native generate")
    parser.add_argument("--size", default="7b")
    parser.add_argument("--skip-unfused", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
              "date": time.strftime("%Y-%m-%d"), "kv_cache": "bf16"}
    out = args.out
    step(result, out, "anchors", device_anchors())
    start = time.perf_counter()
    bundle = load_janus(f"random-{args.size}", "cuda", torch.bfloat16)
    step(result, out, "model", {"model_build_s": time.perf_counter() - start})
    step(result, out, "seed_style", seed_style_anchor(bundle))
    step(result, out, "native", native_generate_anchor(bundle, args.native_images))
    if not args.skip_unfused:
        os.environ["TWIG_BATCH_FUSED"] = "0"
        workload(result, out, "plain (unfused step)", lambda: plain_workload(bundle, args.images))
        os.environ.pop("TWIG_BATCH_FUSED")
    engine = Engine(bundle)  # joined projections, compiled kernels: what every workload below runs
    checks_rows = prompts_of_length(bundle, 4)
    step(result, out, "greedy", greedy_agreement(engine, checks_rows))
    step(result, out, "distribution", distribution_check(engine, checks_rows))
    step(result, out, "graphs", graph_vs_eager(engine, checks_rows))
    del engine
    workload(result, out, "plain", lambda: plain_workload(bundle, args.images))
    for mode in ("twig", "seed"):
        workload(result, out, mode, lambda mode=mode: run_staged(bundle, mode, args.images))
    auto = images_per_call(bundle, GenerationSettings(), free_device_bytes(bundle.device), prompt_tokens=64)
    step(result, out, "auto", {"auto_images_per_call_plain": auto})
    workload(result, out, "plain (batch from free memory)", lambda: plain_workload(bundle, auto))
    step(result, out, "fp8_kernel", fp8_kernel_check())
    workload(result, out, "plain, fp8 KV cache", lambda: plain_workload(bundle, args.images, kv_cache="fp8"))
    fp8 = GenerationSettings(kv_cache="fp8")
    auto8 = images_per_call(bundle, fp8, free_device_bytes(bundle.device), prompt_tokens=64)
    workload(result, out, "plain, fp8 KV cache (batch from free memory)",
             lambda: plain_workload(bundle, auto8, kv_cache="fp8"))
    for mode in ("twig", "seed"):  # what a worker picks when no batch size is given
        staged = images_per_call(bundle, workload_settings(mode), free_device_bytes(bundle.device), prompt_tokens=64)
        step(result, out, "auto", {f"auto_images_per_call_{mode}": staged})
        workload(result, out, f"{mode} (batch from free memory)", lambda mode=mode, n=staged: run_staged(bundle, mode, n))
    print(table(result))


if __name__ == "__main__":
    main()
