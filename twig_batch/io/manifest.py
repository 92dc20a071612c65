"""The manifest: one Parquet row per (id, sample), kept exactly once across crashes and resumes.

While a run is in flight, finished rows are flushed in small Parquet parts to the journal folder.
At the end the previous manifest and every journal part are merged into `manifest.parquet` (one row
per key: an ok row beats an error row, a newer row beats an older one) and the merged parts are
removed. A crash at any point loses at most the rows not yet flushed; their images are simply
redrawn on resume and overwrite identical keys, so the manifest never names a missing object.
"""
from __future__ import annotations

import io
import json
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from twig_batch.io import layout

SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("sample_index", pa.int32()), ("seed", pa.int64()),
    ("mode", pa.string()), ("model", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("image_uri", pa.string()), ("stage_labels", pa.list_(pa.string())),
    ("stage_image_uris", pa.list_(pa.string())), ("thoughts", pa.list_(pa.string())),
    ("reflection_scores", pa.list_(pa.float64())), ("reflections_json", pa.string()),
    ("redrawn_bands", pa.list_(pa.int32())), ("n_triggers", pa.int32()), ("n_injections", pa.int32()),
    ("trigger_log_uri", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("duration_s", pa.float64()), ("finished_at", pa.timestamp("ms", tz="UTC")),
])
KEY_COLUMNS = ("id", "sample_index")


def item_key(prompt_id: str, sample_index: int) -> str:
    return f"{prompt_id}\x1f{int(sample_index)}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def error_row(prompt_id: str, prompt, sample_index: int, seed: int, mode: str, model: str, reason: str) -> dict:
    return {"id": prompt_id, "prompt": prompt, "sample_index": sample_index, "seed": seed, "mode": mode,
            "model": model, "status": "error", "error": reason, "stage_labels": [], "stage_image_uris": [],
            "thoughts": [], "reflection_scores": [], "redrawn_bands": [], "n_triggers": 0, "n_injections": 0,
            "duration_s": 0.0, "finished_at": _now()}


def ok_row(record: dict, model: str, image_uri: str, stages: list[tuple[str, str]], trigger_log_uri: str | None,
           duration_s: float) -> dict:
    """`record` is `ImageResult.record()`; stages are (label, uri) pairs."""
    reflections = record.get("reflections") or []
    return {
        "id": record["id"], "prompt": record["prompt"], "sample_index": record["sample_index"],
        "seed": record["seed"], "mode": record["mode"], "model": model, "status": "ok", "error": None,
        "image_uri": image_uri, "stage_labels": [label for label, _ in stages],
        "stage_image_uris": [uri for _, uri in stages], "thoughts": [str(t) for t in record.get("thoughts") or []],
        "reflection_scores": [_score(r) for r in reflections],
        "reflections_json": json.dumps(reflections, ensure_ascii=False, default=str) if reflections else None,
        "redrawn_bands": [int(b) for b in record.get("redrawn_bands") or []],
        "n_triggers": int(record.get("n_triggers") or 0), "n_injections": int(record.get("n_injections") or 0),
        "trigger_log_uri": trigger_log_uri, "width": record.get("width"), "height": record.get("height"),
        "duration_s": float(duration_s), "finished_at": _now(),
    }


def _score(reflection) -> float | None:
    score = reflection.get("score") if isinstance(reflection, dict) else None
    try:
        return None if score is None else float(score)
    except (TypeError, ValueError):
        return None


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def table_to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def parquet_to_table(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


class ManifestJournal:
    """Buffers finished rows and flushes them as journal parts, by count or by age."""

    def __init__(self, storage, attempt: str, flush_rows: int = 2000, flush_seconds: float = 10.0):
        self.storage, self.attempt = storage, attempt
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._sequence = 0
        self._last_flush = time.monotonic()

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table.select(SCHEMA.names).cast(SCHEMA))
            self._pending_rows += table.num_rows
        if self._pending_rows >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    @property
    def pending_rows(self) -> int:
        """Rows received and not yet flushed: what a crash now would lose."""
        return self._pending_rows

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        part = pa.concat_tables(self._pending)
        self.storage.put(layout.journal_key(self.attempt, self._sequence), table_to_parquet(part))
        self._sequence += 1
        self._pending, self._pending_rows = [], 0


def _journal_keys(storage) -> list[str]:
    return [k for k in storage.list(layout.JOURNAL_DIR) if k.endswith(".parquet")]


def read_recorded(storage, columns: list[str] | None = None) -> tuple[pa.Table, list[str]]:
    """The manifest plus every journal part (not yet deduplicated), and the journal keys read."""
    tables = []
    if storage.exists(layout.MANIFEST):
        tables.append(parquet_to_table(storage.get(layout.MANIFEST)))
    journal = _journal_keys(storage)
    tables += [parquet_to_table(storage.get(key)) for key in journal]
    tables = [t.select(columns or SCHEMA.names).cast(pa.schema([SCHEMA.field(c) for c in columns or SCHEMA.names]))
              for t in tables]
    if not tables:
        return SCHEMA.empty_table().select(columns or SCHEMA.names), journal
    return pa.concat_tables(tables), journal


def ok_keys(storage) -> set[str]:
    """Every (id, sample) already recorded ok, as `item_key` strings: the work a resume skips."""
    table, _ = read_recorded(storage, ["id", "sample_index", "status"])
    ids, samples, statuses = (table.column(c).to_pylist() for c in ("id", "sample_index", "status"))
    return {item_key(i, s) for i, s, st in zip(ids, samples, statuses) if st == "ok"}


def deduplicate(table: pa.Table) -> pa.Table:
    """One row per (id, sample): ok beats error, then the most recently finished wins."""
    ids = table.column("id").to_pylist()
    samples = table.column("sample_index").to_pylist()
    ok = [s == "ok" for s in table.column("status").to_pylist()]
    finished = table.column("finished_at").cast(pa.int64()).fill_null(0).to_pylist()
    best: dict[str, int] = {}
    for row, key in enumerate(item_key(i, s) for i, s in zip(ids, samples)):
        current = best.get(key)
        if current is None or (ok[row], finished[row]) >= (ok[current], finished[current]):
            best[key] = row
    order = sorted(best.values(), key=lambda r: (ids[r], samples[r]))
    return table.take(pa.array(order, type=pa.int64()))


def consolidate(storage) -> pa.Table:
    """Fold the journal into `manifest.parquet` (written atomically), then drop the folded parts."""
    table, journal = read_recorded(storage)
    merged = deduplicate(table)
    storage.put(layout.MANIFEST, table_to_parquet(merged))
    for key in journal:
        storage.delete(key)
    return merged


def manifest_totals(manifest: pa.Table) -> dict:
    """Rows, ok rows and error rows of a consolidated manifest, and the errors' most common causes."""
    from twig_batch.io.row_errors import common_causes

    statuses = manifest.column("status")
    errors = manifest.filter(pc.equal(statuses, "error"))
    return {"manifest_rows": manifest.num_rows, "manifest_ok": int(pc.sum(pc.equal(statuses, "ok")).as_py() or 0),
            "manifest_errors": errors.num_rows, "error_causes": common_causes(errors.column("error").to_pylist())}
