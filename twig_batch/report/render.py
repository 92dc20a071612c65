"""Run -> one self-contained HTML page: a view model built here, the markup in Jinja2 templates.

The templates live in `templates/` as package data. Autoescaping is on for everything, so prompts,
thoughts and ids (user data and model output) can never inject markup into the page.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from twig_batch.report import plots, thumbnails
from twig_batch.report.run_data import Run, attempt_starts, finish_times, map_rows, open_run

DEFAULT_LIMIT = 1000
_ATTEMPT_FIELDS = ("attempt", "started_at", "finished_at", "actors", "gpus_per_actor", "images_per_call",
                   "work_items_per_call", "device", "ok", "errors", "skipped")
_REFLECTION_FIELDS = ("score", "accepted", "problem", "improved", "answer")
_BAND_LABEL = re.compile(r"^band-(\d+)-of-(\d+)(-redrawn)?$")
# Control characters (a random model writes them) would be invalid in the page's text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass
class Band:
    """One band of one image: its drawing(s) in order, the thought behind it, the reflection on it."""

    title: str
    drawings: list[dict] = field(default_factory=list)  # {"caption", "thumb"} (thumb None if missing)
    thought: str | None = None
    reflection: dict | None = None


@dataclass
class ImageView:
    row: dict
    anchor: str
    grid: thumbnails.Thumbnail | None
    bands: list[Band]
    trace_counts: dict | None
    missing: list[str]
    trace: thumbnails.Thumbnail | None = None
    trace_records: list[dict] | None = None  # until the plot is drawn


def visible_text(text) -> str | None:
    return None if text is None else _CONTROL.sub("\ufffd", str(text))


def _bands(row: dict, stages: list[tuple[str, bytes | None]]) -> list[Band]:
    """Group band images by band (a redraw sits next to the drawing it replaced), then attach text."""
    thoughts = row.get("thoughts") or []
    try:
        reflections = json.loads(row.get("reflections_json") or "[]")
    except ValueError:  # a damaged record loses its reflections, not the whole report
        reflections = []
    by_band: dict[int, Band] = {}
    extra: list[Band] = []
    for label, png in stages:
        thumb = thumbnails.band_thumbnail(png) if png is not None else None
        match = _BAND_LABEL.match(label)
        if match is None:  # a label from some other mode: shown as it is, in its place
            extra.append(Band(label, [{"caption": label, "thumb": thumb}]))
            continue
        index, total, redrawn = int(match.group(1)) - 1, int(match.group(2)), bool(match.group(3))
        band = by_band.setdefault(index, Band(f"band {index + 1} of {total}"))
        band.drawings.append({"caption": "after redraw" if redrawn else "drawn", "thumb": thumb})
    for index in range(max([len(thoughts), len(reflections), *(i + 1 for i in by_band)], default=0)):
        band = by_band.setdefault(index, Band(f"band {index + 1}"))
        if index < len(thoughts):
            band.thought = visible_text(thoughts[index])
    for reflection in reflections:
        index = int(reflection.get("band", -1))
        if index in by_band:
            by_band[index].reflection = {key: visible_text(value) if isinstance(value, str) else value
                                         for key, value in ((k, reflection.get(k)) for k in _REFLECTION_FIELDS)}
    for band in by_band.values():
        if len(band.drawings) > 1:
            band.drawings[0]["caption"] = "before redraw"
    return [by_band[i] for i in sorted(by_band)] + extra


def _image_view(assets, row: dict) -> ImageView:
    grid = thumbnails.grid_thumbnail(assets.final) if assets.final is not None else None
    counts = None
    if assets.trigger_log is not None:
        counts = {"evaluations": len(assets.trigger_log),
                  "fires": sum(1 for r in assets.trigger_log if r.get("fired")),
                  "injections": sum(1 for r in assets.trigger_log if r.get("injected"))}
    anchor = f"img-{row['_position']}"
    return ImageView(row, anchor, grid, _bands(row, assets.stages), counts, assets.missing,
                     trace_records=assets.trigger_log)


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    flat = []
    for key, value in values.items():
        if isinstance(value, dict):
            flat += _flatten(value, f"{prefix}{key}.")
        else:
            flat.append((f"{prefix}{key}", value))
    return flat


# Settings a mode never reads, left out of its report: plain draws in one pass, twig thinks and
# reflects (think_max_tokens, reflect, theta), seed writes stage guidance (guidance_*).
_UNUSED_SETTINGS = {"plain": {"reflect", "theta", "think_max_tokens", "guidance_max_tokens", "guidance_temperature"},
                    "twig": {"guidance_max_tokens", "guidance_temperature"},
                    "seed": {"reflect", "theta", "think_max_tokens"}}


def _columns(mode: str | None, settings: dict) -> dict:
    """Which per-band texts and counts the mode has: the report shows only those."""
    reflects = mode == "twig" and settings.get("reflect", True)
    return {"text": {"twig": "thought", "seed": "stage guidance"}.get(mode), "reflection": bool(reflects),
            "controller": bool(settings.get("controller"))}


def summary(run: Run, images: list[ImageView]) -> dict:
    ok, errors = run.ok_rows, run.error_rows
    series = plots.throughput(finish_times(ok), (attempt_starts(run.info) or [None])[0])
    durations = [r["duration_s"] for r in ok if r.get("duration_s") is not None]
    info = run.info
    mode = info.get("mode") or next((r["mode"] for r in run.rows if r.get("mode")), None)
    settings = info.get("settings") or {}
    unused = _UNUSED_SETTINGS.get(mode, set()) | {"controller", "mode"}
    return {
        "status": "complete" if run.complete else (info.get("status") or "unfinished"),
        "model": info.get("model") or next((r["model"] for r in run.rows if r.get("model")), None),
        "mode": mode,
        "columns": _columns(mode, settings),
        "counts": {"rows": len(run.rows), "ok": len(ok), "error": len(errors),
                   "redrawn_bands": sum(len(r.get("redrawn_bands") or []) for r in ok),
                   "triggers": sum(r.get("n_triggers") or 0 for r in ok),
                   "injections": sum(r.get("n_injections") or 0 for r in ok)},
        "elapsed_s": (run.complete or {}).get("elapsed_s"),
        "images_per_s": (run.complete or {}).get("images_per_s"),
        "mean_duration_s": sum(durations) / len(durations) if durations else None,
        "settings": _flatten({k: v for k, v in settings.items() if k not in unused}),
        "controller": _flatten(settings.get("controller") or {}),
        "run_fields": [(k, info.get(k)) for k in ("base_seed", "samples_per_prompt", "prompt_column", "id_column",
                                                  "created_at", "updated_at") if k in info],
        "input": info.get("input") or {},
        "templates": info.get("templates"),
        "attempts": [{key: attempt.get(key) for key in _ATTEMPT_FIELDS} for attempt in info.get("attempts") or []],
        "versions": info.get("versions") or {},
        "throughput": thumbnails.png_thumbnail(plots.plot_throughput(series)) if series else None,
        "errors": [{k: visible_text(v) if isinstance(v, str) else v for k, v in r.items()} for r in errors],
        "shown": len(images),
    }


def build_report(dest: str, limit: int | None = DEFAULT_LIMIT) -> tuple[str, int]:
    """The report's HTML, and how many <img> elements it holds."""
    run = open_run(dest)
    shown = run.ok_rows if limit is None else run.ok_rows[:limit]
    for position, row in enumerate(shown):
        row["_position"] = position
        row["prompt"] = visible_text(row.get("prompt"))
    images = map_rows(run.storage, shown, _image_view)
    # Plots are drawn here, one at a time: matplotlib is not meant to be driven from several threads.
    for view in images:
        if view.trace_records:
            view.trace = thumbnails.png_thumbnail(plots.plot_trigger_trace(view.trace_records))
        view.trace_records = None
    page = summary(run, images)
    html = _environment().get_template("report.html.j2").render(summary=page, images=images, dest=run.uri)
    return html, count_images(page, images)


def count_images(page: dict, images: list[ImageView]) -> int:
    drawings = sum(1 for view in images for band in view.bands for d in band.drawings if d["thumb"] is not None)
    return (page["throughput"] is not None) + sum((v.grid is not None) + (v.trace is not None) for v in images) \
        + drawings


def write_report(dest: str, out: str | Path, limit: int | None = DEFAULT_LIMIT) -> dict:
    html, image_count = build_report(dest, limit)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    staging.write_text(html, encoding="utf-8")
    staging.replace(out)
    return {"path": str(out), "images": image_count, "bytes": len(html.encode("utf-8"))}


def _environment() -> Environment:
    environment = Environment(loader=PackageLoader("twig_batch.report", "templates"),
                              autoescape=select_autoescape(["html", "j2"], default=True),
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["number"] = _number
    return environment


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
