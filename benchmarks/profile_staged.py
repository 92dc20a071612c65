"""Where a staged workload's time goes, kernel by kernel: torch.profiler over one batch.

Usage: python benchmarks/profile_staged.py --mode twig|seed [--images 32] [--out DIR]
Prints the top operators by GPU time and by host time, and the share of the run the GPU was busy.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_common import phase_totals, requests_for, workload_settings
from twig_batch.model import load_janus
from twig_batch.engine.runner import Engine
from twig_batch.pipeline import generate_images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("twig", "seed"), nargs="+", default=["twig", "seed"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    bundle = load_janus("random-7b", "cuda", torch.bfloat16)
    for mode in args.mode:
        settings = workload_settings(mode)
        requests = requests_for(args.images)
        engine = Engine.for_settings(bundle, settings)
        generate_images(bundle, requests[:2], settings, engine=engine)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            results = generate_images(bundle, requests, settings, engine=engine)
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        phases = phase_totals(results)
        events = prof.key_averages()
        gpu_busy = sum(e.self_device_time_total for e in events) / 1e6
        report = [f"== {mode}: {args.images} images in {wall:.1f}s under the profiler; GPU busy {gpu_busy:.1f}s; "
                  f"phases {({k: round(v, 2) for k, v in phases.items()})}",
                  events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60),
                  events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60)]
        text = "\n".join(report)
        (args.out / f"profile_{mode}.txt").write_text(text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
