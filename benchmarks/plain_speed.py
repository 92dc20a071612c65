"""Speed of plain text-to-image on one GPU, beside the anchors of BENCHMARK.md, in one run.

Usage: python benchmarks/plain_speed.py --out DIR [--images 128] [--size 7b]
Writes DIR/plain_speed.json and DIR/plain_speed.md. Model: Janus-Pro-sized, random weights, bf16.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_common import device_anchors, native_generate_anchor, plain_workload, prompts_of_length, seed_style_anchor
from bf16_checks import graph_vs_eager, greedy_agreement
from twig_batch.model import load_janus


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, nargs="+", default=[128, 160])
    parser.add_argument("--size", default="7b")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    result |= device_anchors()
    start = time.perf_counter()
    bundle = load_janus(f"random-{args.size}", "cuda", torch.bfloat16)
    result["model_build_s"] = time.perf_counter() - start
    import transformers
    result["transformers"] = transformers.__version__
    result |= seed_style_anchor(bundle)
    checks_rows = prompts_of_length(bundle, 4)
    result |= greedy_agreement(bundle, checks_rows) | graph_vs_eager(bundle, checks_rows)
    result["plain"] = [plain_workload(bundle, n) for n in args.images]
    result["plain"].append(plain_workload(bundle, args.images[0], use_graphs=False))
    result |= native_generate_anchor(bundle, 16)
    (args.out / "plain_speed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
