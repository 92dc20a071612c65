"""`run.json`: what a run was asked to do and with what software; the marker that it finished.

A resume must draw the missing images exactly as the first attempt would have, so it refuses to
continue a run whose model, mode, settings or seed differ. Nothing secret is ever recorded here:
addresses are stored as given (they cannot hold credentials), the environment is not.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import sys
import uuid
from datetime import datetime, timezone

from twig_batch.errors import InputError
from twig_batch.io import layout

# Fields a resume must match: they decide which image a (id, sample) gets.
IDENTITY_FIELDS = ("model", "mode", "settings", "base_seed", "prompt_column", "id_column", "seed_column",
                   "templates")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_attempt_id() -> str:
    """`20260101T120000Z-1a2b3c`: sorts by start time; names the attempt's journal parts."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_identity(model: str, settings, base_seed: int, templates, prompt_column: str | None = None,
                 id_column: str | None = None, seed_column: str | None = None) -> dict:
    """The IDENTITY_FIELDS of a run (`settings` a GenerationSettings, `templates` prompts.Templates or
    None), as the JSON values run.json holds."""
    return json.loads(json.dumps({
        "model": model, "mode": settings.mode, "settings": settings.to_dict(), "base_seed": base_seed,
        "prompt_column": prompt_column, "id_column": id_column, "seed_column": seed_column,
        "templates": dataclasses.asdict(templates) if templates is not None else None}, default=str))


def software_versions() -> dict:
    """The installed releases, read from the packages' metadata: nothing is imported (the driver
    does not load torch)."""
    from importlib.metadata import PackageNotFoundError, version

    import twig_batch

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"twig_batch": twig_batch.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
            **{name: installed(name) for name in ("torch", "transformers", "ray", "pyarrow")}}


def read_run_info(storage) -> dict | None:
    if not storage.exists(layout.RUN_INFO):
        return None
    try:
        return json.loads(storage.get(layout.RUN_INFO))
    except ValueError as exc:
        raise InputError(f"{storage.uri(layout.RUN_INFO)} is not valid JSON ({exc}); it is not a twig-batch run") from None


def write_run_info(storage, info: dict) -> None:
    info["updated_at"] = utc_now()
    storage.put(layout.RUN_INFO, json.dumps(info, indent=2, ensure_ascii=False, default=str).encode())


def check_resume_matches(previous: dict, current: dict, where: str) -> None:
    previous = with_settings_added_since(previous)
    differing = [name for name in IDENTITY_FIELDS if previous.get(name) != current.get(name)]
    if differing:
        detail = "; ".join(_difference(name, previous.get(name), current.get(name)) for name in differing)
        raise InputError(f"cannot resume the run in {where} with different {', '.join(differing)} ({detail}); "
                         "use the original options, --overwrite to replace the run, or a new output destination")


def _difference(name: str, was, now) -> str:
    if isinstance(was, dict) and isinstance(now, dict):  # the settings: only the keys that differ
        return "; ".join(_difference(f"{name}.{key}", was.get(key), now.get(key))
                         for key in sorted(set(was) | set(now)) if was.get(key) != now.get(key))
    return f"{name}: was {was!r}, now {now!r}"


def with_settings_added_since(previous: dict) -> dict:
    """A run recorded before a setting existed ran with its default: compare it so."""
    from twig_batch.settings import GenerationSettings

    recorded = previous.get("settings")
    if not isinstance(recorded, dict):
        return previous
    defaults = json.loads(json.dumps(GenerationSettings().to_dict(), default=str))
    return previous | {"settings": defaults | recorded}


def write_complete_marker(storage, summary: dict) -> None:
    storage.put(layout.COMPLETE_MARKER, json.dumps({"finished_at": utc_now(), **summary}, indent=2).encode())


TOTALS = ("manifest_rows", "manifest_ok", "manifest_errors", "error_causes")  # see `manifest.manifest_totals`


def record_complete(storage, info: dict, summary: dict) -> None:
    """A finished run's last two writes: run.json says complete, with the manifest's totals from
    `summary`, then the completion marker for its last attempt holds `summary`."""
    info.update(status="complete", totals={k: summary[k] for k in TOTALS})
    write_run_info(storage, info)
    write_complete_marker(storage, {"attempt": info["attempts"][-1]["attempt"], **summary})  # last: final
