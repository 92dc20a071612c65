"""Where an actor's start goes, step by step: imports, the tokenizer, the model build, the engine's
kernels. Run it twice on one machine to see the kernels compiled (first) and read back from
Triton's cache on disk (second); the engine's construction is also profiled by function.

    python3 benchmarks/startup_profile.py --model random-7b --out startup.json [--profile 30] [--first-call 16]

`--first-call N` then draws N plain images twice through the pipeline, as an actor's first two parts
would, and profiles the first: what a worker's first part pays that later parts do not.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

started = time.perf_counter()
marks: dict[str, float] = {}


def mark(name: str, since: float) -> float:
    now = time.perf_counter()
    marks[name] = round(now - since, 3)
    return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-7b")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", type=int, default=30, help="functions listed from the engine's profile")
    parser.add_argument("--first-call", type=int, default=0, help="images of the two parts drawn after the start")
    args = parser.parse_args()
    now = started
    import torch
    now = mark("import_torch", now)
    import transformers  # noqa: F401
    now = mark("import_transformers", now)
    import twig_batch.distributed.image_generator  # noqa: F401 (what an actor's process imports first)
    now = mark("import_actor_module", now)
    from twig_batch.model.tiny import train_tiny_tokenizer
    train_tiny_tokenizer()
    now = mark("tokenizer", now)
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    now = mark("cuda_context", now)
    from twig_batch.model import load_janus
    bundle = load_janus(args.model, torch.device("cuda"), torch.bfloat16)
    torch.cuda.synchronize()
    now = mark("model", now)
    from twig_batch.engine.runner import Engine
    engine, profiles = profiled(lambda: Engine(bundle), args.profile, "engine")
    now = mark("engine", now)
    marks["total"] = round(now - started, 3)
    if args.first_call:
        from twig_batch.pipeline import ImageRequest, generate_images
        from twig_batch.settings import GenerationSettings

        settings = GenerationSettings(mode="plain")
        for part in ("first_part", "second_part"):
            requests = [ImageRequest(f"{part}-{i}", f"a red fox in the snow, study {i}", 0, 1000 + i)
                        for i in range(args.first_call)]
            if part == "first_part":
                _, found = profiled(lambda: generate_images(bundle, requests, settings, engine=engine), args.profile,
                                    part)
                profiles.update(found)
            else:
                generate_images(bundle, requests, settings, engine=engine)
            torch.cuda.synchronize()
            now = mark(part, now)
    print(json.dumps(marks))
    for name, text in profiles.items():
        print(f"--- {name}\n{text}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "marks": marks, "profiles": profiles}, f, indent=1)


def profiled(fn, lines: int, name: str):
    """fn's result, and its profile (the `lines` costliest functions, cumulative) under `name`."""
    profile = cProfile.Profile()
    profile.enable()
    out = fn()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(lines)
    return out, {name: text.getvalue()}


if __name__ == "__main__":
    main()
