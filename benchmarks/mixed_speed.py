"""The mixed loop beside the lockstep engine on one GPU (random Janus-Pro-7B-sized, bf16), per mode.

Usage: python benchmarks/mixed_speed.py --out DIR [--modes plain seed twig] [--images 64] [--no-lockstep]
       [--syncs N] [--defaults] [--step-tokens 2048 ...] [--max-programs 128 ...] [--host-round R --host-wait W]
Each mode's workload is BENCHMARK.md's (`bench_common.workload_settings`; plain: the model's defaults),
or with --defaults the settings `twig-batch run` uses by default (set TWIG_BATCH_EMULATE_TEXT_LENGTHS
for realistic text lengths). With several --step-tokens or --max-programs the mixed loop runs
once per combination (its step budget, `STEP_TOKENS`; images in it at once, `MAX_PROGRAMS`);
--host-round and --host-wait replace the loop's `HOST_ROUND` and `HOST_WAIT` for the whole run.
Both paths run the same requests once after a two-image warm-up (kernels compiled); the lockstep
engine draws them in parts as a worker plans and sizes them (`lockstep_part`: what fits the free
memory, in parts of about equal size), the mixed loop's pages fill the free memory. Reported per path:
images/s and peak memory (a path that runs out of memory is recorded as such, `*_error`, and the
other still runs), and for the mixed loop its steps and redo passes of injected runs, the
sequences and tokens one step fed on average and where its time went (`MixedLoop.seconds`; with
--profile each step waits for its forward pass and its redos, so "forward" and "controller" are the
device's time); and how many image codes the two paths share (bf16 sampling: a first differing token
changes every later one). With --syncs N, the mixed loop then draws N images
once more under torch's sync debug mode and the record counts where the host waited for the device
(`sync_sites.py`; untimed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from bench_common import controller_for, oom_record, requests_for, start_fresh, workload_settings
from sync_sites import counted_syncs
from twig_batch.distributed.image_generator import even_parts, part_size
from twig_batch.engine.mixed import loop as loop_module
from twig_batch.engine.mixed.loop import MAX_PROGRAMS
from twig_batch.engine.mixed.sizing import STEP_TOKENS, mixed_loop
from twig_batch.engine.runner import Engine
from twig_batch.model import load_janus
from twig_batch.pipeline import generate_images
from twig_batch.pipeline.mixed import generate_mixed
from twig_batch.pipeline.sequences import call_shape
from twig_batch.settings import GenerationSettings


def timed(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def run_mode(bundle, mode: str, images: int, profile: bool, lockstep: bool = True, sync_images: int = 0,
             defaults: bool = False, step_tokens: int = STEP_TOKENS, max_programs: int = MAX_PROGRAMS) -> dict:
    settings = GenerationSettings(mode=mode) if defaults or mode == "plain" else workload_settings(mode)
    requests = requests_for(images)
    engine = Engine.for_settings(bundle, settings)
    record = {"mode": mode, "images": images, "settings": "defaults" if defaults else "workload",
              "step_tokens": step_tokens, "max_programs": max_programs}
    drawn = None
    if lockstep:
        drawn, lockstep_record = _path("lockstep", lambda: _lockstep(bundle, settings, requests, engine))
        engine.release()
        record |= lockstep_record
    start_fresh()
    mixed, record_mixed = _path("mixed", lambda: _mixed(bundle, settings, requests, engine, profile, step_tokens,
                                                         max_programs))
    record |= record_mixed
    if drawn is not None and mixed is not None:
        shared = sum(int((a.codes == b.codes).sum()) for a, b in zip(drawn, mixed))
        record["codes_shared"] = shared / sum(r.codes.numel() for r in mixed)
    if sync_images:
        start_fresh()
        few = requests[:sync_images]
        with counted_syncs() as sites:
            generate_mixed(bundle, few, settings, controller_for(bundle, settings, few, engine), engine=engine)
        record["syncs"] = {"images": len(few), "sites": dict(sites.most_common())}
    return record


def _path(prefix: str, run) -> tuple[list | None, dict]:
    """(images, record) of one path (`prefix`: "lockstep" or "mixed"), with its peak memory; an
    out-of-memory error is recorded instead, and the run goes on to the other path."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        images, record = run()
    except torch.OutOfMemoryError as exc:
        images, record = None, {f"{prefix}_{key}": value for key, value in oom_record(exc).items()}
    if torch.cuda.is_available():
        record[f"{prefix}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return images, record


def _lockstep(bundle, settings, requests, engine) -> tuple[list, dict]:
    """The lockstep engine, in parts as a worker plans and sizes them, after a two-image warm-up."""
    images = len(requests)
    settings = dataclasses.replace(settings, loop="lockstep")  # `auto` runs twig on a GPU in the mixed loop
    generate_images(bundle, requests[:2], settings, engine=engine)
    start_fresh()
    size = even_parts(images, part_size(bundle, settings, [r.prompt for r in requests], None, engine.free_bytes()))
    engine.reserve(call_shape(bundle, settings), size)
    drawn, seconds = timed(lambda: [image for first in range(0, images, size) for image in
                                    generate_images(bundle, requests[first:first + size], settings, engine=engine)])
    return drawn, {"lockstep_img_s": images / seconds, "lockstep_s": seconds, "lockstep_part": size}


def _mixed(bundle, settings, requests, engine, profile: bool, step_tokens: int, max_programs: int
           ) -> tuple[list, dict]:
    """The mixed loop over every page the free memory holds, after a two-image warm-up (kernels compiled)."""
    images = len(requests)
    generate_mixed(bundle, requests[:2], settings, controller_for(bundle, settings, requests[:2], engine),
                   engine=engine, loop=mixed_loop(bundle, engine.model, pages=4096))
    start_fresh()
    loop = mixed_loop(bundle, engine.model, profile=profile, step_tokens=step_tokens)
    loop.max_programs = max_programs
    fill, host = _StepFill(loop), _HostCallTimes()
    try:
        mixed, seconds = timed(lambda: generate_mixed(bundle, requests, settings,
                                                      controller_for(bundle, settings, requests, engine),
                                                      engine=engine, loop=loop))
    finally:
        host.stop()
    steps = loop.steps
    return mixed, {"tokens_per_image": loop.fed_tokens / images, "step_fill": fill.shares(), "host_calls": host.record,
                   "mixed_img_s": images / seconds, "mixed_s": seconds, "mixed_steps": steps,
                   "mixed_step_ms": 1000 * seconds / steps, "rows_per_step": loop.fed_rows / steps,
                   "tokens_per_step": loop.fed_tokens / steps, "pages": loop.pool.pages,
                   "page_size": loop.pool.page_size, "profiled": profile, "seconds": loop.seconds,
                   "redo_passes": loop.redo_passes,
                   "injections_per_image": sum(r.record()["n_injections"] for r in mixed) / images}


class _StepFill:
    """Counts a loop's steps (not its redo passes) by how full they were: tokens fed over its step budget."""
    EDGES = (0.25, 0.5, 0.75, 0.95)

    def __init__(self, loop):
        self.counts = [0] * (len(self.EDGES) + 1)
        step, budget = loop._step, loop.step_tokens

        def counted(runs):
            before = loop.fed_tokens
            done = step(runs)
            if loop.fed_tokens > before:
                share = (loop.fed_tokens - before) / budget
                self.counts[sum(share >= edge for edge in self.EDGES)] += 1
            return done

        loop._step = counted

    def shares(self) -> dict:
        total = sum(self.counts) or 1
        labels = ["<25%", "25-50%", "50-75%", "75-95%", ">=95%"]
        return {label: count / total for label, count in zip(labels, self.counts)}


class _HostCallTimes:
    """Times the loop's rounds of host calls (host time: what they queue on the device runs on)."""

    def __init__(self):
        self.record = {"rounds": 0, "calls": 0, "seconds": 0.0}
        self.original = loop_module._call_together

        def timed_round(calls):
            start = time.perf_counter()
            results = self.original(calls)
            self.record["rounds"] += 1
            self.record["calls"] += len(calls)
            self.record["seconds"] += time.perf_counter() - start
            return results

        loop_module._call_together = timed_round

    def stop(self) -> None:
        loop_module._call_together = self.original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", nargs="+", default=["plain", "seed", "twig"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="wait for every step's forward pass, to time it")
    parser.add_argument("--no-lockstep", action="store_true", help="the mixed loop alone")
    parser.add_argument("--defaults", action="store_true", help="the settings `twig-batch run` uses by default")
    parser.add_argument("--step-tokens", type=int, nargs="+", default=[STEP_TOKENS])
    parser.add_argument("--max-programs", type=int, nargs="+", default=[MAX_PROGRAMS])
    parser.add_argument("--host-round", type=int, default=loop_module.HOST_ROUND)
    parser.add_argument("--host-wait", type=int, default=loop_module.HOST_WAIT)
    parser.add_argument("--syncs", type=int, default=0, metavar="N",
                        help="then N images under torch's sync debug mode: where the host waits (untimed)")
    args = parser.parse_args()
    loop_module.HOST_ROUND, loop_module.HOST_WAIT = args.host_round, args.host_wait
    bundle = load_janus("random-7b", "cuda", torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    runs = [(mode, tokens, programs) for mode in args.modes for tokens in args.step_tokens
            for programs in args.max_programs]
    for mode, step_tokens, max_programs in runs:
        record = run_mode(bundle, mode, args.images, args.profile, not args.no_lockstep, args.syncs,
                          args.defaults, step_tokens, max_programs)
        record |= {"host_round": args.host_round, "host_wait": args.host_wait, "gpu": torch.cuda.get_device_name(),
                   "date": time.strftime("%Y-%m-%d")}
        records.append(record)
        print(json.dumps(record), flush=True)
        (args.out / "mixed_speed.json").write_text(json.dumps(records, indent=1))
        start_fresh()


if __name__ == "__main__":
    main()
