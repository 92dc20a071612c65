"""Where seed mode's image-token time goes: the seed workload at 128 images with the latent
controller off, and with it evaluated every step but never firing (no injections, no thinks).
The suite's seed row is the third point (9 forced injections per image). Writes OUT/seed_breakdown.json.

    python seed_breakdown.py --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bench_common import run_staged, start_fresh, workload_settings
from twig_batch.model import load_janus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=128)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = load_janus("random-7b", "cuda", torch.bfloat16)
    seed = workload_settings("seed")
    silent = dataclasses.replace(seed.controller, force_every=0)  # evaluated every step, never fires
    variants = {"controller off": dataclasses.replace(seed, controller=None),
                "controller evaluated, never fires": dataclasses.replace(seed, controller=silent)}
    result = {"gpu": torch.cuda.get_device_name(), "images": args.images}
    for name, settings in variants.items():
        result[name] = run_staged(bundle, "seed", args.images, settings)
        print(name, json.dumps(result[name]), flush=True)
        (args.out / "seed_breakdown.json").write_text(json.dumps(result, indent=2))
        start_fresh()


if __name__ == "__main__":
    main()
