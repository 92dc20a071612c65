"""What more than one benchmark uses, in one module: the prompts, timing on the GPU, the plain and
staged workloads with their anchors, and `twig-batch run` as a user runs it, with its records.

Scripts import it as `from bench_common import ...` (Python puts a script's own folder first on its
path); a child process started with `python -c` puts this folder on its path first. The engine's
own modules are imported inside the workloads that time them.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from twig_batch.settings import ControllerConfig
from twig_batch.pipeline import ImageRequest, generate_images
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.settings import GenerationSettings


# ---- prompts ----

SUBJECTS = ["a red fox", "an old lighthouse", "a bowl of ramen", "a vintage bicycle", "two children flying a kite",
            "a glass teapot", "a snow leopard", "a paper boat", "a robot gardener", "a stack of books"]


SETTINGS = ["on a misty hill at dawn", "in a busy night market", "beside a frozen lake", "on a sunlit kitchen table",
            "in a desert at noon", "under cherry blossoms", "inside a quiet library", "on a rainy city street"]


STYLES = ["oil painting", "studio photograph", "watercolor illustration", "35mm film still", "isometric 3D render",
          "charcoal sketch"]


def prompts(n: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]} {SETTINGS[(i // len(SUBJECTS)) % len(SETTINGS)]}, "
            f"{STYLES[(i // 7) % len(STYLES)]}, detailed, soft light" for i in range(n)]


def write(path: str, n: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"b{i:05d}" for i in range(n)], "prompt": prompts(n)}), path)
    return path

# ---- timing on the GPU ----

COPY_BYTES_S, MATMUL_FLOP_S = 4.25e12, 790e12  # BENCHMARK.md's copy and bf16 matmul rates of an H200


def oom_record(exc: Exception) -> dict:
    """What a benchmark keeps of an out-of-memory error, so that the rest of its run goes on."""
    return {"error": f"out of memory: {str(exc)[:400]}", "reserved_gib": torch.cuda.memory_reserved() / 2**30,
            "allocated_gib": torch.cuda.memory_allocated() / 2**30}


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def cuda_ms(fn, repeat: int = 20) -> float:
    fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeat


def graph_time(fn, reps: int = 20) -> float:
    """Milliseconds per call of `fn` (itself several layers), replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps

# ---- plain: prompts of one length, the workload and its anchors ----

WORDS = "a small red cube on a wooden table next to a blue lamp under warm morning light".split()


def prompts_of_length(bundle, n: int, tokens: int = 64) -> list[list[int]]:
    """n distinct conditional rows of exactly `tokens` tokens (BOS + chat turn + begin-of-image)."""
    rows = []
    for i in range(n):
        words, row = [], []
        while True:
            candidate = t2i_prompt_ids(bundle, " ".join(words + [WORDS[(i + len(words)) % len(WORDS)]]))
            if len(candidate) > tokens:
                break
            words.append(WORDS[(i + len(words)) % len(WORDS)])
            row = candidate
        rows.append(row)
    return rows


def device_anchors() -> dict:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    _, t = timed(lambda: [y.copy_(x) for _ in range(10)])
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    a @ a
    _, m = timed(lambda: [a @ a for _ in range(10)])
    del x, y, a
    return {"copy_tb_s": 2 * 2 * 1024**3 * 10 / t / 1e12, "bf16_matmul_tflop_s": 2 * 8192**3 * 10 / m / 1e12}


def seed_style_anchor(bundle, steps: int = 64) -> dict:
    """One image, CFG pair, eager LM over transformers' dynamic cache, as the design's prototype does."""
    from transformers import DynamicCache

    from twig_batch.reference.forward import cached_forward

    lm = bundle.language_model
    ids = torch.tensor(prompts_of_length(bundle, 1)[0], device="cuda").repeat(2, 1)
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        hidden = cached_forward(lm, cache, inputs_embeds=bundle.embed_text(ids)).last_hidden_state
        token = torch.zeros(2, dtype=torch.long, device="cuda")

        def loop():
            for _ in range(steps):
                cached_forward(lm, cache, inputs_embeds=bundle.embed_image_codes(token).unsqueeze(1))
        _, t = timed(loop)
    return {"seed_style_ms_per_step": t / steps * 1e3, "seed_style_s_per_image_576": t / steps * 576}


def native_generate_inputs(bundle, images: int) -> torch.Tensor:
    """`images` prompts cut to one width, each still ending on begin-of-image: no padding to mask."""
    rows = prompts_of_length(bundle, images)
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width - 1] + r[-1:] for r in rows], device=bundle.device)


def native_generate(bundle, ids: torch.Tensor) -> torch.Tensor:
    """transformers' own Janus image `generate` over `ids`, CFG 5, sampled: the codes, [rows, image tokens].

    It builds the unconditional rows from the bundle's generation config (pad and begin-of-image ids);
    the attention mask it needs is ours to pass.
    """
    return bundle.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                 do_sample=True, guidance_scale=5.0, max_new_tokens=bundle.image_tokens)


def native_generate_anchor(bundle, images: int = 128) -> dict:
    try:
        ids = native_generate_inputs(bundle, images)
        _, t = timed(lambda: native_generate(bundle, ids))
        return {"native_images": images, "native_s": t, "native_img_s": images / t}
    except Exception as exc:  # recorded, not fatal: a broken release must not cost the rest of the suite
        return {"native_error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def plain_workload(bundle, images: int, use_graphs: bool = True, kv_cache: str = "model") -> dict:
    """The batch drawn twice: first cold (graph captures), then as a worker's every later batch is."""
    from twig_batch.engine.runner import Engine
    from twig_batch.imaging import decode_codes
    from twig_batch.pipeline.sequences import call_shape

    settings = GenerationSettings(kv_cache=kv_cache)
    rows = prompts_of_length(bundle, images)
    seeds = list(range(images))
    engine = Engine(bundle, kv_cache=kv_cache, use_graphs=use_graphs)  # compiled kernels, outside both timings
    engine.reserve(call_shape(bundle, settings, prompt_tokens=64), images)  # as a worker does before its first batch
    runs = []
    for _ in range(2):
        torch.cuda.reset_peak_memory_stats()
        codes, t_tokens = timed(lambda: engine.draw_image_tokens(rows, seeds, settings, bundle.image_tokens))
        _, t_decode = timed(lambda: decode_codes(bundle, codes))  # it decodes DECODE_CHUNK images a pass
        runs.append((t_tokens, t_decode))
    (cold_tokens, cold_decode), (t_tokens, t_decode) = runs
    total = t_tokens + t_decode
    return {"images": images, "cuda_graphs": use_graphs, "kv_cache": kv_cache, "tokens_s": t_tokens, "decode_s": t_decode, "img_s": images / total,
            "ms_per_step": t_tokens / bundle.image_tokens * 1e3, "cold_img_s": images / (cold_tokens + cold_decode),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}

# ---- staged (twig, seed) ----

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


def controller_for(bundle, settings, requests, engine):
    """The latent controller of `settings` over `requests` (None without one), running `engine`'s model."""
    if settings.controller is None:
        return None
    from twig_batch.controller import LatentController
    from twig_batch.controller.weights import shared_controller_net

    return LatentController(bundle, [r.prompt for r in requests], settings.controller,
                            weights=shared_controller_net(bundle, settings.controller), model=engine.model)


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
    """Drop the engine of the part before (its KV arena and kept graphs) and PyTorch's cached blocks:
    each part of a benchmark sizes itself from the same free memory."""
    gc.collect()
    torch.cuda.empty_cache()


def run_staged(bundle, mode: str, images: int, settings: GenerationSettings | None = None) -> dict:
    """The batch run twice after a two-image warm-up (compiled kernels): first cold (graph captures
    for this batch's shapes), then as a worker's every later batch runs; the second is the figure.
    `settings` replaces the workload's own (`workload_settings(mode)`)."""
    from twig_batch.engine.runner import Engine
    from twig_batch.pipeline.sequences import call_shape

    settings = settings or workload_settings(mode)
    requests = requests_for(images)
    engine = Engine.for_settings(bundle, settings)  # as a worker builds its own
    generate_images(bundle, requests[:2], settings, engine=engine)
    engine.reserve(call_shape(bundle, settings), images)  # as a worker does before its first batch
    runs = []
    for _ in range(2):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        results = generate_images(bundle, requests, settings, engine=engine)
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    cold, elapsed = runs
    return {"mode": mode, "images": images, "seconds": elapsed, "img_s": images / elapsed, "cold_img_s": images / cold,
            "phase_seconds": phase_totals(results), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "injections_per_image": sum(r.record()["n_injections"] for r in results) / len(results)}

# ---- `twig-batch run` as a user runs it, and its records ----

LENGTHS_VAR = "TWIG_BATCH_EMULATE_TEXT_LENGTHS"


STOP_GRACE_S = 60  # a stopped run records what it drew and stops its actors within this


def run_cli(prompts: str, dest: Path | str, model: str, mode: str, controller: bool, lengths: str, log,
            actors: int | None = None, time_limit_s: float | None = None, options: tuple[str, ...] = ()) -> dict:
    """One `twig-batch run` into `dest` (a folder or an s3:// URI, read back through the run's own
    storage layer), with `options` added to its command line, and its record; a run past
    `time_limit_s` is stopped and recorded as cut."""
    from twig_batch.io.storage import open_storage

    env = dict(os.environ)
    env.pop(LENGTHS_VAR, None)
    if lengths == "realistic":
        env[LENGTHS_VAR] = "realistic"
    command = [sys.executable, "-m", "twig_batch.cli", "run", prompts, "--output", str(dest), "--model", model,
               "--mode", mode, "--controller" if controller else "--no-controller"]
    if actors:
        command += ["--actors", str(actors)]
    command += list(options)
    log.write(f"$ {' '.join(command)}\n")
    start = time.monotonic()
    # Each output line is logged at once, with the seconds since the command started: where a run's start
    # goes, and what a run cut short had done.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Past its time limit the run gets a Ctrl-C, as a user would give it: it records what it drew and
    # its actors stop, instead of running on beside the next run.
    limit = threading.Timer(time_limit_s, process.send_signal, [signal.SIGINT]) if time_limit_s else None
    if limit is not None:
        limit.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append((round(time.monotonic() - start, 2), line.rstrip()))
            log.write(f"{lines[-1][0]:8.2f} {lines[-1][1]}\n")
            log.flush()
        exit_code = process.wait()
    finally:
        if limit is not None:
            limit.cancel()
        _stop(process)
    wall = time.monotonic() - start
    log.write("\n")
    log.flush()
    record = {"exit_code": exit_code, "wall_s": round(wall, 2), "last_line": lines[-1][1] if lines else "",
              "cut": bool(time_limit_s) and wall >= time_limit_s,
              # the driver's own start (imports, joining the cluster, reading the input) before its first line
              "first_line_after_s": lines[0][0] if lines else None}
    storage = open_storage(str(dest))
    if exit_code != 0 or not storage.exists("_COMPLETE.json"):
        return record
    summary = json.loads(storage.get("_COMPLETE.json"))
    attempt = json.loads(storage.get("run.json"))["attempts"][-1]
    stats = attempt.get("actor_stats", {}).values()
    # After its first part (which pays the graph captures); in the mixed loop, whose later rows were
    # drawn partly before its first ones, over all of its drawing time.
    engine = [a["images"] / a["busy_s"] if a.get("loop") == "mixed" else
              (a["images"] - a["first_part_images"]) / (a["busy_s"] - a["first_part_s"])
              for a in stats if a.get("parts", 0) > 1 and a["busy_s"] > a["first_part_s"]]
    record.update(
        actors=len(stats), ok=summary["ok"], errors=summary["errors"], total_img_s=round(summary["ok"] / wall, 3),
        driver_img_s=summary["images_per_s"], steady_img_s=summary.get("steady_images_per_s"),
        engine_img_s=round(sum(engine), 3) if engine else None,
        startup_s=max((a.get("startup_s", 0) for a in stats), default=None),
        # From the run's start to the first model call: Ray, reading, the actor's process and __init__.
        first_call_after_s=max((round(a["first_part_at"] - a["first_part_s"], 2) for a in stats
                                if "first_part_at" in a), default=None),
        model_load_s=max((a.get("model_load_s") or 0 for a in stats), default=None),
        part_images=sorted({a.get("part_images") for a in stats if a.get("part_images")}),
        loops=sorted({a["loop"] for a in stats if a.get("loop")}),
        busy_share=round(sum(a.get("busy_s", 0) for a in stats) / wall / max(len(stats), 1), 3),
        part_event_counts=attempt.get("part_event_counts", {}))
    finished = [a["last_part_at"] for a in stats if "last_part_at" in a]
    if len(finished) > 1:  # how long the first actor to finish waited for the last: the run's tail
        record["finish_spread_s"] = round(max(finished) - min(finished), 2)
    if record["steady_img_s"] and record["engine_img_s"]:
        record["ratio"] = round(record["steady_img_s"] / record["engine_img_s"], 3)
    return record


def _stop(process: subprocess.Popen) -> None:
    """A run still going when its caller stops (an exception, SIGTERM): Ctrl-C, then kill after a grace."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def end_runs_on_sigterm() -> None:
    """`timeout` and job schedulers stop a benchmark with SIGTERM: raise in the main thread instead of
    dying at once, so that the run it started is stopped too and the records so far stay written."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def add_record(records: list[dict], record: dict, out: Path, name: str, table) -> None:
    """Keep `record`: DIR/NAME.json and DIR/NAME.md are rewritten after every run, so a run cut short
    loses only itself."""
    records.append(record)
    (out / f"{name}.json").write_text(json.dumps(records, indent=1))
    (out / f"{name}.md").write_text(table(records) + "\n")
    print(json.dumps(record), flush=True)


def number(record: dict, key: str, digits: int = 2) -> str:
    """A table cell: the record's number, or '-' where the run has none."""
    value = record.get(key)
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"
