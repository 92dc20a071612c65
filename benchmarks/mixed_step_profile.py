"""Where a mixed-loop step's time goes, kernel by kernel: torch.profiler over a few decode steps.

Usage: python benchmarks/mixed_step_profile.py --out DIR [--modes plain seed twig] [--images 32] [--first 200]
       [--steps 10]
Per mode, images of that mode (random Janus-Pro-7B-sized, bf16, one model for every mode; seed and
twig: BENCHMARK.md's workloads, seed with its controller): steps `first` .. `first + steps` of the
loop are profiled (plain: all rows decoding by then), and the loop stops there. Prints and writes the
steps' wall time, the GPU's busy time over them, their floor (the KV they read at the copy rate plus
their matmuls at the matmul rate, `floor_ms`) and the ratio of the two, and the top kernels by GPU
time and operators by host time.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_common import COPY_BYTES_S, MATMUL_FLOP_S, controller_for, requests_for, workload_settings
from twig_batch.engine.mixed.loop import MixedLoop
from twig_batch.engine.mixed.sizing import mixed_loop
from twig_batch.engine.runner import Engine
from twig_batch.model import load_janus
from twig_batch.pipeline.mixed import generate_mixed
from twig_batch.settings import GenerationSettings


# The 7B model's sizes: a step's floor is its KV read at the copy rate plus its matmuls at the matmul
# rate (or its weights at the copy rate, for steps of few tokens); today's kernels overlap neither.
KV_BYTES_PER_TOKEN, WEIGHT_BYTES, FLOP_PER_TOKEN = 491_520, 13.82e9, 2 * 6.9e9


def floor_ms(kv_tokens: int, fed_tokens: int, passes: int) -> float:
    """The floor of `passes` forward passes that read `kv_tokens` cached tokens and feed `fed_tokens`."""
    matmuls = max(fed_tokens * FLOP_PER_TOKEN / MATMUL_FLOP_S, passes * WEIGHT_BYTES / COPY_BYTES_S)
    return 1000 * (kv_tokens * KV_BYTES_PER_TOKEN / COPY_BYTES_S + matmuls)


class _Profiled(Exception):
    """Raised after the last profiled step: the rest of the run would tell nothing more."""


class ProfiledSteps:
    """Wraps a loop's `_step`: the steps first .. first + count run under torch.profiler; their passes
    (`_feed`: steps and redos) are counted for the floor; then the run stops (`_Profiled`)."""

    def __init__(self, loop: MixedLoop, first: int, count: int):
        self.loop, self.first, self.count = loop, first, count
        self.step, self.prof, self.started = loop._step, None, 0.0
        self.wall = 0.0
        self.kv_tokens = self.fed_tokens = self.passes = 0
        loop._step = self
        feed = loop._feed

        def counted_feed(chunks, fixed):
            if self.prof is not None and not self.wall:
                self.passes += 1
                self.fed_tokens += sum(c.count for c in chunks)
                self.kv_tokens += sum(c.sequence.length + c.count for c in chunks)  # what attention reads
            return feed(chunks, fixed)

        loop._feed = counted_feed

    def __call__(self, runs):
        index = self.loop.steps
        if index == self.first:
            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.started = time.perf_counter()
            self.fed = (self.loop.fed_rows, self.loop.fed_tokens)
        done = self.step(runs)
        if index == self.first + self.count - 1:
            torch.cuda.synchronize()
            self.wall = time.perf_counter() - self.started
            self.fed = (self.loop.fed_rows - self.fed[0], self.loop.fed_tokens - self.fed[1])
            self.prof.__exit__(None, None, None)
            raise _Profiled
        return done


def profile_mode(bundle, mode: str, images: int, first: int, steps: int) -> dict:
    settings = GenerationSettings(mode="plain") if mode == "plain" else workload_settings(mode)
    engine = Engine.for_settings(bundle, settings)
    requests = requests_for(images)
    generate_mixed(bundle, requests[:2], settings, controller_for(bundle, settings, requests[:2], engine),
                   engine=engine, loop=mixed_loop(bundle, engine.model, pages=4096))
    loop = mixed_loop(bundle, engine.model, pages=8192)
    watch = ProfiledSteps(loop, first, steps)
    try:
        generate_mixed(bundle, requests, settings, controller_for(bundle, settings, requests, engine), engine=engine,
                       loop=loop)
    except _Profiled:
        pass
    if not watch.wall:
        raise RuntimeError(f"{mode}: {images} images ran {loop.steps} steps, fewer than {first + steps}")
    events = watch.prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    by_gpu = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:25]
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    step_ms = 1000 * watch.wall / steps
    floor = floor_ms(watch.kv_tokens, watch.fed_tokens, watch.passes) / steps
    return {"mode": mode, "images": images, "first": first, "steps": steps, "step_ms": step_ms,
            "gpu_busy_ms_per_step": gpu_us / 1000 / steps, "rows_per_step": watch.fed[0] / steps,
            "tokens_per_step": watch.fed[1] / steps, "passes_per_step": watch.passes / steps,
            "kv_tokens_per_step": watch.kv_tokens / steps, "floor_ms_per_step": floor,
            "step_over_floor": step_ms / floor,
            "top_gpu": [{"name": e.key[:80], "ms_per_step": e.self_device_time_total / 1000 / steps,
                         "calls_per_step": e.count / steps} for e in by_gpu],
            "top_host": [{"name": e.key[:80], "ms_per_step": e.self_cpu_time_total / 1000 / steps,
                          "calls_per_step": e.count / steps} for e in by_host]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", nargs="+", choices=("plain", "seed", "twig"), default=["plain"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--first", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    bundle = load_janus("random-7b", "cuda", torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        report = profile_mode(bundle, mode, args.images, args.first, args.steps)
        (args.out / f"mixed_step_profile_{mode}.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in report.items() if not k.startswith("top")}))
        for key in ("top_gpu", "top_host"):
            print(key)
            for row in report[key]:
                print(f"  {row['ms_per_step']:8.3f} ms  {row['calls_per_step']:7.1f} calls  {row['name']}")
        gc.collect()  # the loop and its profiled steps hold each other: free its pages before the next mode
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
