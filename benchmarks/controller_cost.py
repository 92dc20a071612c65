"""What the latent controller at its defaults costs, and why: plain mode at N images with the
controller off, evaluated every step but never firing, and at its defaults (as `--controller` runs
it), each through `generate_images` as an actor calls it. For the default run it also counts the
injections and the distinct steps at which any image of the batch was injected: each such step is one
extra pass over the injected images.

    python controller_cost.py --out DIR [--images 128] [--mode plain]
Writes DIR/controller_cost.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from bench_common import requests_for, start_fresh
from twig_batch.controller import ControllerConfig
from twig_batch.engine.runner import Engine
from twig_batch.model import load_janus
from twig_batch.pipeline import generate_images
from twig_batch.pipeline.sequences import call_shape
from twig_batch.settings import GenerationSettings

NEVER_FIRES = ControllerConfig(tau_entropy=float("inf"), tau_drop=float("inf"))


def timed_run(bundle, settings: GenerationSettings, images: int) -> dict:
    requests = requests_for(images)
    engine = Engine.for_settings(bundle, settings)
    engine.reserve(call_shape(bundle, settings), images)
    generate_images(bundle, requests, settings, engine=engine)  # graph captures for this batch's shapes
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = generate_images(bundle, requests, settings, engine=engine)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    logs = [r.trigger_log for r in results]
    injected_steps = {(t["band"], t["attempt"], t["step"]) for log in logs for t in log if t.get("injected")}
    return {"images": images, "seconds": round(seconds, 2), "img_s": round(images / seconds, 3),
            "injections_per_image": sum(r.record()["n_injections"] for r in results) / images,
            "steps_with_an_injection": len(injected_steps),
            "evaluations_per_image": sum(len(log) for log in logs) / images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--mode", default="plain")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = load_janus("random-7b", "cuda", torch.bfloat16)
    base = GenerationSettings(mode=args.mode)
    variants = {"controller off": base,
                "evaluated every step, never fires": dataclasses.replace(base, controller=NEVER_FIRES),
                "defaults (--controller)": dataclasses.replace(base, controller=ControllerConfig())}
    result = {"gpu": torch.cuda.get_device_name(), "mode": args.mode, "date": time.strftime("%Y-%m-%d")}
    for name, settings in variants.items():
        result[name] = timed_run(bundle, settings, args.images)
        print(name, json.dumps(result[name]), flush=True)
        (args.out / "controller_cost.json").write_text(json.dumps(result, indent=2))
        start_fresh()


if __name__ == "__main__":
    main()
