"""The batch job end to end: `twig-batch run` itself, default settings, as a user runs it.

Usage: python benchmarks/job_speed.py --out DIR [--model random-7b] [--images 512] [--modes plain,twig,seed]
                                      [--controller off,on] [--lengths limit,realistic] [--engine-process]
                                      [--native-images 128] [--actors N] [--loops auto,lockstep,mixed]

For each mode x controller x text lengths, one `twig-batch run` over a fresh output folder (it joins
the cluster `ray start` left on this machine, if any, like a workstation user's run), then reads what
the run recorded (`_COMPLETE.json`, `run.json`) and reports:
- total_img_s: images over the run's whole wall time, Ray and actor start included;
- steady_img_s: the driver's figure once running (each actor's rows after its first part, over the
  time from that part's arrival to its last);
- engine_img_s: the engine at the same settings in the same run: the actors' own timing of the model
  calls after each one's first part (`generate_images` alone; no writing, no Ray);
  with --engine-process, also engine_process_img_s: `generate_images` timed in a process of its own
  (no Ray, no writers) on two parts of the size the actor chose, the second timed;
- ratio: steady / engine; startup_s: the slowest actor's `__init__` (model build and kernel compilation);
  first_call_after_s: from the run's start to the slowest actor's first model call (Ray, the read,
  the actor's process start and `__init__`);
- busy_share: the share of the run's wall time the GPU spent in model calls.
With --native-images N (128 by default; 0 skips it), the same run ends with the anchor: transformers'
own Janus image `generate` over N images in a process of its own (`bench_common.py`), a record of
mode "native". With --actors N each run passes `--actors N` (e.g. two runs side by side on a
two-GPU machine, one actor each); otherwise the CLI's default. With --loops, each cell runs once per
loop setting (`--set loop=...`; auto: none passed, the CLI's default); the record names the loop each
actor ran.
`lengths=limit` lets every text run to its token limit (what random weights do);
`lengths=realistic` stops texts at lengths drawn per row (TWIG_BATCH_EMULATE_TEXT_LENGTHS=realistic,
twig_batch/pipeline/text_lengths.py says where the numbers come from).
Writes DIR/job_speed.json (a list of records, rewritten after each run) and DIR/job_speed.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import LENGTHS_VAR, add_record, end_runs_on_sigterm, number, run_cli
from bench_common import write as write_prompts

HERE = Path(__file__).resolve().parent  # a child process started with `python -c` finds bench_common here


def engine_process(model: str, mode: str, controller: bool, lengths: str, part_images: int) -> float | None:
    """`generate_images` alone in a fresh process: two parts of `part_images`, the second timed."""
    env = dict(os.environ)
    env.pop(LENGTHS_VAR, None)
    if lengths == "realistic":
        env[LENGTHS_VAR] = "realistic"
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {str(HERE)!r})
from bench_common import prompts
from twig_batch.controller import ControllerConfig
from twig_batch.model import load_janus
from twig_batch.engine.runner import Engine
from twig_batch.pipeline import ImageRequest, generate_images
from twig_batch.settings import GenerationSettings
bundle = load_janus({model!r}, "cuda", torch.bfloat16)
settings = GenerationSettings(mode={mode!r}, controller=ControllerConfig() if {controller!r} else None)
engine = Engine.for_settings(bundle, settings)
n = {part_images}
texts = prompts(2 * n)
requests = [ImageRequest(f"e{{i}}", texts[i], 0, 1000 + i) for i in range(2 * n)]
generate_images(bundle, requests[:n], settings, engine=engine)
torch.cuda.synchronize(); start = time.perf_counter()
generate_images(bundle, requests[n:], settings, engine=engine)
torch.cuda.synchronize()
print(json.dumps({{"img_s": n / (time.perf_counter() - start)}}))
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return round(json.loads(done.stdout.strip().splitlines()[-1])["img_s"], 3)


def native_anchor(model: str, images: int) -> dict:
    """transformers' own Janus `generate` over `images` images, in a process of its own."""
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(HERE)!r})
from bench_common import native_generate_anchor
from twig_batch.model import load_janus
bundle = load_janus({model!r}, "cuda", torch.bfloat16)
native_generate_anchor(bundle, 4)  # warm-up: the libraries' lazy set-up is not the anchor's time
print(json.dumps(native_generate_anchor(bundle, {images})))
"""
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return {"native_error": done.stderr[-500:]}
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {"images": images, "total_img_s": round(found["native_img_s"], 3)} if "native_img_s" in found else found


def table(records: list[dict]) -> str:
    lines = ["| mode | controller | text lengths | loop | images | actors | ok | total img/s | steady img/s | "
             "engine img/s | steady / engine | startup s | part | GPU busy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        def f(key, digits=2):
            return number(r, key, digits)
        loop = ",".join(r.get("loops", [])) or "-"
        lines.append(f"| {r['mode']} | {'on' if r['controller'] else 'off'} | {r['lengths']} | {loop} | {r['images']} | "
                     f"{r.get('actors', '-')} | "
                     f"{r.get('ok', '-' if r['mode'] == 'native' else 'failed')} | {f('total_img_s')} | {f('steady_img_s')} | {f('engine_img_s')} | "
                     f"{f('ratio')} | {f('startup_s', 1)} | {','.join(map(str, r.get('part_images', [])))} | "
                     f"{f('busy_share')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="random-7b")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--modes", default="plain,twig,seed")
    parser.add_argument("--controller", default="off,on")
    parser.add_argument("--lengths", default="limit,realistic")
    parser.add_argument("--engine-process", action="store_true")
    parser.add_argument("--native-images", type=int, default=128)
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--loops", default="auto", help="each run once per loop setting (auto: the CLI's default)")
    parser.add_argument("--run-time-limit-s", type=float, default=None,
                        help="stop a run past this many seconds (Ctrl-C) and record it as cut")
    args = parser.parse_args()
    end_runs_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "job_speed.json"
    records = json.loads(results.read_text()) if results.exists() else []  # several invocations add up
    work = Path(tempfile.mkdtemp(prefix="job-speed-"))
    prompts = write_prompts(str(work / "prompts.parquet"), args.images)
    with open(args.out / "job_speed.log", "a") as log:
        for mode in args.modes.split(","):
            for controller in [c == "on" for c in args.controller.split(",")]:
                for lengths, loop in itertools.product(args.lengths.split(","), args.loops.split(",")):
                    if mode == "plain" and lengths == "realistic":
                        continue  # plain writes no text
                    dest = work / f"{mode}-{controller}-{lengths}-{loop}"
                    record = {"mode": mode, "controller": controller, "lengths": lengths, "loop": loop,
                              "images": args.images, "model": args.model, "date": time.strftime("%Y-%m-%d")}
                    options = () if loop == "auto" else ("--set", f"loop={loop}")
                    record.update(run_cli(prompts, dest, args.model, mode, controller, lengths, log, args.actors,
                                          time_limit_s=args.run_time_limit_s, options=options))
                    if args.engine_process and record.get("part_images"):
                        record["engine_process_img_s"] = engine_process(args.model, mode, controller, lengths,
                                                                        record["part_images"][0])
                    add_record(records, record, args.out, "job_speed", table)
    if args.native_images:
        record = {"mode": "native", "controller": False, "lengths": "-", "model": args.model,
                  "date": time.strftime("%Y-%m-%d")} | native_anchor(args.model, args.native_images)
        add_record(records, record, args.out, "job_speed", table)
    print(table(records))


if __name__ == "__main__":
    main()
