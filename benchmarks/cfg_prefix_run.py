"""The shared CFG prefix on the GPU: its bf16 check (seed-length prompts, shared against unshared),
then seed, twig and plain at 128 images as in the suite. Writes OUT/cfg_prefix_run.json.

    python cfg_prefix_run.py --out DIR
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from bf16_checks import shared_prefix_check
from plain_speed import plain_workload, prompts_of_length
from staged_speed import run_staged
from twig_batch.engine.fused import fuse_decoder
from twig_batch.engine.graphs import forget_graphs
from twig_batch.engine.kv_arena import release_arenas
from twig_batch.model import load_janus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=128)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = load_janus("random-7b", "cuda", torch.bfloat16)
    fuse_decoder(bundle.language_model)
    result = {"gpu": torch.cuda.get_device_name(), "images": args.images}
    parts = [("check", lambda: shared_prefix_check(bundle, prompts_of_length(bundle, 4, 460))),
             ("seed", lambda: run_staged(bundle, "seed", args.images)),
             ("twig", lambda: run_staged(bundle, "twig", args.images)),
             ("plain", lambda: plain_workload(bundle, args.images))]
    for name, run in parts:
        result[name] = run()
        print(name, json.dumps(result[name])[:700], flush=True)
        (args.out / "cfg_prefix_run.json").write_text(json.dumps(result, indent=2))
        forget_graphs()  # each part starts from the same memory, as in the suite
        release_arenas()
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
