"""`twig-batch run --dry-run`: every check a run makes before it starts, and what it would do.

No model is loaded, no Ray cluster joined or started, and nothing is left in the destination (the
write check puts one probe object there and removes it; a local folder it had to create is removed
again).
"""
from __future__ import annotations

import json
from pathlib import Path

from twig_batch.distributed.progress import format_duration
from twig_batch.distributed.run_config import RunConfig
from twig_batch.settings import GenerationSettings

# README.md's Speed table: a Janus-Pro-7B-sized model in bf16 on one H200, images per second.
H200_7B_RATES = {"plain": 10.85, "twig": 3.60, "seed": 4.58}


def dry_run(config: RunConfig, echo=print) -> dict:
    from twig_batch.distributed.batch_job import preflight
    from twig_batch.distributed.cluster import address_to_join

    created = _local_folder_to_create(config.output)
    try:
        checked = preflight(config)
    finally:
        if created is not None and created.is_dir() and not any(created.iterdir()):
            created.rmdir()
    total = checked.total(config.samples_per_prompt)
    distinct = checked.source.rows - checked.repeats.copies
    done = min(len(checked.skip), total)
    to_draw = total - done
    cluster = address_to_join()
    summary = {"prompts": checked.source.rows, "files": len(checked.files.paths), "images": total,
               "already_done": done, "to_draw": to_draw, "output": checked.storage.root_uri,
               "earlier_run": _earlier(checked), "model": _model(config.model),
               "settings": _changed_settings(config.settings),
               "cluster": f"joins the Ray cluster at {cluster}" if cluster else "starts a private local Ray cluster",
               "estimate": _estimate(config.model, config.settings, to_draw)}
    echo("dry run: every check passed; no model loaded, nothing drawn or written")
    echo(f"  input:    {checked.source.rows} prompt(s) in {len(checked.files.paths)} file(s) ({checked.files.uri})")
    echo(f"  images:   {distinct} x {config.samples_per_prompt} sample(s) = {total}; {done} already "
         f"recorded ok; {to_draw} to draw")
    if checked.repeats.copies:
        echo(f"  repeats:  {checked.repeats.describe()}")
    echo(f"  output:   {checked.storage.root_uri} (writable; {summary['earlier_run']})")
    echo(f"  model:    {summary['model']}")
    echo(f"  settings: mode {config.settings.mode}" + "".join(f", {k} {v}" for k, v in summary["settings"].items()))
    echo(f"  cluster:  {summary['cluster']}")
    echo(f"  estimate: {summary['estimate']}")
    return summary


def _local_folder_to_create(output: str) -> Path | None:
    if "://" in output:
        return None
    path = Path(output).expanduser()
    return None if path.exists() else path


def _earlier(checked) -> str:
    if checked.replaced:
        return checked.replaced.split(": ", 1)[1].replace("all removed", "all would be removed")
    if checked.previous is not None:
        return f"resumes the run there ({len(checked.skip)} image(s) recorded)"
    return "a new run"


def _model(ref: str) -> str:
    from twig_batch.distributed.worker_checks import missing_on_this_machine
    from twig_batch.model.checkpoint import BUILTIN_GRIDS, detect_layout, model_geometry

    if ref in BUILTIN_GRIDS:
        grid = BUILTIN_GRIDS[ref]
        return f"{ref}: a random tiny Janus built offline on first use ({grid}x{grid} image tokens)"
    if ref.startswith("random-"):
        return f"{ref}: a random model of Janus-Pro's size, for speed measurements"
    if missing_on_this_machine(ref):
        return f"folder {ref}: not on this machine; the run looks for it on a worker before any model loads"
    geometry = model_geometry(ref)
    if geometry is not None:
        grid = geometry[0]
        layout = "transformers'" if detect_layout(Path(ref).expanduser()) == "hf" else "DeepSeek's"
        return f"folder {ref}: a checkpoint in {layout} layout ({grid}x{grid} image tokens), complete"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(ref, "config.json"), str)
    except Exception:
        cached = False
    where = "in this machine's Hugging Face cache" if cached else \
        "not in this machine's Hugging Face cache: each worker downloads it (or finds it in its own cache)"
    return f"Hugging Face id {ref}: {where}"


def _changed_settings(settings: GenerationSettings) -> dict:
    """The settings that differ from the defaults, as they would be recorded."""
    from twig_batch.settings import ControllerConfig

    default = json.loads(json.dumps(GenerationSettings(mode=settings.mode).to_dict(), default=str))
    current = json.loads(json.dumps(settings.to_dict(), default=str))
    changed = {key: value for key, value in current.items() if key != "mode" and value != default.get(key)}
    if isinstance(changed.get("controller"), dict):  # on: named with the numbers that differ from its defaults
        defaults = json.loads(json.dumps(ControllerConfig().to_dict(), default=str))
        numbers = {k: v for k, v in changed["controller"].items() if v != defaults.get(k)}
        changed["controller"] = "on" + "".join(f" {k}={v}" for k, v in numbers.items())
    return changed


def _estimate(ref: str, settings: GenerationSettings, images: int) -> str:
    from twig_batch.model.checkpoint import BUILTIN_GRIDS

    if images == 0:
        return "nothing to draw"
    if ref in BUILTIN_GRIDS:
        return f"{images} image(s) of a tiny model: its speed is the CPU's (seconds to minutes), no estimate"
    rate = H200_7B_RATES[settings.mode]
    extra = "; more with the controller" if settings.controller is not None else ""
    return (f"{images} image(s) take about {format_duration(images / rate)} of one H200 for a 7B model in "
            f"{settings.mode} mode ({rate} images/s, README.md's Speed table){extra}; n GPUs take 1/n of that, "
            "plus model loading (minutes)")
