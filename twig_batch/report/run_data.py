"""Reading a finished (or still running) batch run back from DEST for the report.

Everything goes through `twig_batch.io.storage`, so a local folder and an `s3://` prefix read the
same way. The manifest names its objects by URI; a run that was copied or synced elsewhere keeps
its old URIs, so a URI outside DEST is mapped back onto the output layout by its last components.
Objects are fetched by a small thread pool: on S3 a report of 1,000 images is a few thousand GETs.
"""
from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow.parquet as pq

from twig_batch.errors import InputError
from twig_batch.io import layout
from twig_batch.io.manifest import deduplicate, read_recorded
from twig_batch.io.run_info import read_run_info
from twig_batch.io.storage import read_destination

FETCH_THREADS = 16


@dataclass
class Run:
    """What the report knows about a run: its records and every manifest row, deduplicated."""

    uri: str
    info: dict  # run.json ({} when absent)
    complete: dict | None  # the completion marker, or None while the run is unfinished or crashed
    rows: list[dict]  # manifest rows in manifest order (id, sample)
    storage: object = field(repr=False)

    @property
    def ok_rows(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "ok"]

    @property
    def error_rows(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]


@dataclass
class Assets:
    """The stored objects of one image: PNG bytes and its trigger log (None where absent or missing)."""

    final: bytes | None
    stages: list[tuple[str, bytes | None]]  # (label, PNG) in the order they were drawn
    trigger_log: list[dict] | None
    missing: list[str]  # URIs the manifest names that could not be read


def open_run(dest: str) -> Run:
    """Open DEST; a folder or prefix that holds neither run.json nor a manifest is not a run."""
    return read_destination(dest, _read_run, "read the run in")


def _read_run(storage) -> Run:
    info = read_run_info(storage)
    table, journal = read_recorded(storage)
    if info is None and not journal and not storage.exists(layout.MANIFEST):
        raise InputError(f"{storage.root_uri} holds no twig-batch run (no {layout.RUN_INFO} and no manifest)")
    complete = None
    if storage.exists(layout.COMPLETE_MARKER):
        complete = json.loads(storage.get(layout.COMPLETE_MARKER))
    rows = deduplicate(table).to_pylist() if table.num_rows else []
    return Run(storage.root_uri, info or {}, complete, rows, storage)


def object_key(storage, uri: str | None) -> str | None:
    """The storage key behind a manifest URI, also for a run moved away from where it was written."""
    if not uri:
        return None
    root = storage.root_uri.rstrip("/") + "/"
    if uri.startswith(root):
        return uri[len(root):]
    parts = uri.replace("\\", "/").split("/")
    # images/<h2>/<slug>-<hash>/<file>: the layout puts every image object exactly this deep.
    if len(parts) >= 4 and parts[-4] == layout.IMAGES_DIR:
        return "/".join(parts[-4:])
    return None


def _read(storage, uri: str | None, missing: list[str]) -> bytes | None:
    key = object_key(storage, uri)
    try:
        if key is None:
            raise FileNotFoundError(uri)
        return storage.get(key)
    except (FileNotFoundError, ValueError):
        missing.append(uri)
        return None


def load_assets(storage, row: dict) -> Assets:
    missing: list[str] = []
    final = _read(storage, row.get("image_uri"), missing)
    labels = row.get("stage_labels") or []
    uris = row.get("stage_image_uris") or []
    stages = [(label, _read(storage, uri, missing)) for label, uri in zip(labels, uris)]
    trigger_log = None
    if row.get("trigger_log_uri"):
        data = _read(storage, row["trigger_log_uri"], missing)
        if data is not None:
            trigger_log = pq.read_table(io.BytesIO(data)).to_pylist()
    return Assets(final, stages, trigger_log, missing)


def map_rows(storage, rows: list[dict], work, threads: int = FETCH_THREADS) -> list:
    """`work(Assets, row)` for every row, objects fetched concurrently, results in row order."""
    getattr(storage, "client", None)  # make an S3 client once, before the threads share it

    def one(row):
        return work(load_assets(storage, row), row)

    if len(rows) <= 1:
        return [one(row) for row in rows]
    with ThreadPoolExecutor(max_workers=min(threads, len(rows))) as pool:
        return list(pool.map(one, rows))


def finish_times(rows: list[dict]) -> list[float]:
    """POSIX seconds at which each recorded row finished (rows without a time are left out)."""
    stamps = [r.get("finished_at") for r in rows]
    return sorted(s.timestamp() for s in stamps if isinstance(s, datetime))


def attempt_starts(info: dict) -> list[float]:
    starts = []
    for attempt in info.get("attempts") or []:
        try:
            starts.append(datetime.fromisoformat(attempt["started_at"]).timestamp())
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(starts)
