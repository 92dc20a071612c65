"""The batch job over 1, 2, ... GPUs of one host: `twig-batch run` itself, one actor per GPU.

Usage: python benchmarks/scaling.py --out DIR [--gpus 1,2] [--runs plain:4096,twig+controller:1024]
                                    [--model random-7b] [--lengths limit|realistic]
                                    [--output-root s3://bucket/prefix] [--run-time-limit-s S]

Each run is job_speed.py's CLI run (`bench_common.run_cli`: default settings but the mode,
`--controller` and `--actors N`) on a fresh output folder, joining the cluster `ray start` left on this machine. Per run: total and
steady images/s, the slowest actor's start, each actor's busy share (its own timing of model calls
over the run's wall time), the finish spread (how long the first actor to finish its last part waited
for the last one: the run's tail), and the efficiency against one GPU in the same invocation:
images/s on N GPUs / (N x images/s on 1); `--gpus 2` alone compares with the latest one-GPU record of
the same run already in DIR/scaling.json. Writes DIR/scaling.json (a list of records) and
DIR/scaling.md. `--output-root` puts the runs' outputs there instead of a temporary folder (an
s3:// URI: the actors write every image to S3; the records say where).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_common import add_record, end_runs_on_sigterm, number, run_cli
from bench_common import write as write_prompts


def efficiency(record: dict, one_gpu: dict | None, key: str) -> float | None:
    if not one_gpu or not record.get(key) or not one_gpu.get(key):
        return None
    return round(record[key] / (record["gpus"] * one_gpu[key]), 3)


def earlier_one_gpu(records: list[dict], run: str, images: int, model: str, lengths: str,
                    to_s3: bool = False) -> dict | None:
    """The latest one-GPU record of the same run (and the same kind of destination) in DIR/scaling.json:
    a machine call too short for both runs can measure one GPU first and two GPUs later on the same
    hardware."""
    same = [r for r in records if r["gpus"] == 1 and r["run"] == run and r["images"] == images
            and r["model"] == model and r.get("lengths", "limit") == lengths and r.get("ok")
            and str(r.get("output", "")).startswith("s3://") == to_s3]
    return same[-1] if same else None


def table(records: list[dict]) -> str:
    lines = ["| GPUs | run | lengths | images | ok | wall s | total img/s | steady img/s | efficiency total | "
             "efficiency steady | actor start s | GPU busy | finish spread s |", "| --- " * 13 + "|"]
    for r in records:
        def f(key, digits=2):
            return number(r, key, digits)
        lines.append(f"| {r['gpus']} | {r['run']} | {r.get('lengths', 'limit')} | {r['images']} | {r.get('ok', 'failed')} | {f('wall_s', 1)} | "
                     f"{f('total_img_s')} | {f('steady_img_s')} | {f('efficiency_total')} | "
                     f"{f('efficiency_steady')} | {f('startup_s', 1)} | {f('busy_share')} | {f('finish_spread_s', 1)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", default="1,2")
    parser.add_argument("--runs", default="plain:4096,twig+controller:1024")
    parser.add_argument("--model", default="random-7b")
    parser.add_argument("--lengths", default="limit", choices=["limit", "realistic"])
    parser.add_argument("--output-root", default=None, help="where the runs write (default: a temporary folder)")
    parser.add_argument("--run-time-limit-s", type=float, default=None,
                        help="stop a run past this many seconds (Ctrl-C) and record it as cut")
    args = parser.parse_args()
    end_runs_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "scaling.json"
    records = json.loads(results.read_text()) if results.exists() else []
    work = Path(tempfile.mkdtemp(prefix="scaling-"))
    with open(args.out / "scaling.log", "a") as log:
        for run in args.runs.split(","):
            name, images = run.split(":")
            mode, controller = name.split("+")[0], name.endswith("+controller")
            prompts = write_prompts(str(work / f"prompts-{images}.parquet"), int(images))
            one_gpu = earlier_one_gpu(records, name, int(images), args.model, args.lengths,
                                      to_s3=str(args.output_root or "").startswith("s3://"))
            for gpus in [int(g) for g in args.gpus.split(",")]:
                record = {"gpus": gpus, "run": name, "mode": mode, "controller": controller, "images": int(images),
                          "lengths": args.lengths, "model": args.model, "date": time.strftime("%Y-%m-%d")}
                dest = f"{args.output_root.rstrip('/')}/{name}-{gpus}" if args.output_root else work / f"{name}-{gpus}"
                if args.output_root:
                    record["output"] = dest
                record.update(run_cli(prompts, dest, args.model, mode, controller, args.lengths, log, actors=gpus,
                                      time_limit_s=args.run_time_limit_s))
                if gpus == 1:
                    one_gpu = record
                record["efficiency_total"] = efficiency(record, one_gpu, "total_img_s")
                record["efficiency_steady"] = efficiency(record, one_gpu, "steady_img_s")
                add_record(records, record, args.out, "scaling", table)
    print(table(records))


if __name__ == "__main__":
    main()
