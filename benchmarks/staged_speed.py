"""Speed of the twig and seed workloads of BENCHMARK.md on one GPU (random Janus-Pro-7B-sized, bf16).

Usage: python benchmarks/staged_speed.py --out DIR --mode twig|seed [--images 32]
Random weights never emit end-of-sequence, so every thought, reflection and stage plan runs to its
token limit (64, 64 and 300), and no reflection parses, so every band is accepted, as the workload asks.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from twig_batch.controller.config import ControllerConfig
from twig_batch.engine.graphs import forget_graphs
from twig_batch.engine.kv_arena import release_arenas
from twig_batch.engine.memory import reserve_kv_arena
from twig_batch.model import load_janus
from twig_batch.pipeline import ImageRequest, generate_images
from twig_batch.settings import GenerationSettings

PROMPT = "a small red cube on a wooden table next to a blue lamp under warm morning light, photo"


def workload_settings(mode: str) -> GenerationSettings:
    if mode == "twig":
        return GenerationSettings(mode="twig", bands=3, reflect=True, think_max_tokens=64)
    # seed: 300 sampled guidance tokens per stage; the controller evaluated every step and forced to
    # fire on every image every 64 steps (9 injections per image); the natural trigger is switched
    # off so that random weights' flat distributions add no fires of their own.
    controller = ControllerConfig(eval_every=1, force_every=64, min_gap=0, min_history=1,
                                  tau_entropy=float("inf"), tau_drop=float("inf"))
    return GenerationSettings(mode="seed", bands=3, guidance_max_tokens=300, controller=controller)


def requests_for(images: int) -> list[ImageRequest]:
    return [ImageRequest(str(i), f"{PROMPT} {i}", 0, i) for i in range(images)]


def phase_totals(results) -> dict[str, float]:
    """Seconds per phase over a batch (each image carries its share of the batched calls)."""
    phases: dict[str, float] = {}
    for r in results:
        for phase, seconds in r.timings.items():
            phases[phase] = phases.get(phase, 0.0) + seconds
    return phases


def start_fresh() -> None:
    """Drop the KV arena and the kept graphs of the part before, and PyTorch's cached blocks: each
    part of a benchmark sizes itself from the same free memory."""
    forget_graphs()
    release_arenas()
    gc.collect()
    torch.cuda.empty_cache()


def run_staged(bundle, mode: str, images: int, settings: GenerationSettings | None = None) -> dict:
    """The batch run twice after a two-image warm-up (compiled kernels): first cold (graph captures
    for this batch's shapes), then as a worker's every later batch runs; the second is the figure.
    `settings` replaces the workload's own (`workload_settings(mode)`)."""
    settings = settings or workload_settings(mode)
    requests = requests_for(images)
    generate_images(bundle, requests[:2], settings)
    reserve_kv_arena(bundle, settings, images)  # as a worker does before its first batch
    runs = []
    for _ in range(2):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        results = generate_images(bundle, requests, settings)
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    cold, elapsed = runs
    return {"mode": mode, "images": images, "seconds": elapsed, "img_s": images / elapsed, "cold_img_s": images / cold,
            "phase_seconds": phase_totals(results), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "injections_per_image": sum(r.record()["n_injections"] for r in results) / len(results)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=("twig", "seed"), required=True)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", default="7b")
    args = parser.parse_args()
    bundle = load_janus(f"random-{args.size}", "cuda", torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        report = run_staged(bundle, args.mode, args.images)
    except torch.cuda.OutOfMemoryError:  # what held the memory is the only useful record of an OOM
        (args.out / f"oom_{args.mode}.txt").write_text(torch.cuda.memory_summary())
        raise
    report |= {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    (args.out / f"staged_speed_{args.mode}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
