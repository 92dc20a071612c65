"""Speed of the twig and seed workloads of BENCHMARK.md on one GPU (random Janus-Pro-7B-sized, bf16).

Usage: python benchmarks/staged_speed.py --out DIR --mode twig|seed [--images 32]
Random weights never emit end-of-sequence, so every thought, reflection and stage plan runs to its
token limit (64, 64 and 300), and no reflection parses, so every band is accepted, as the workload asks.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_common import run_staged
from twig_batch.model import load_janus


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
