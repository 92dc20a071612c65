"""One finished image -> its objects under DEST (final PNG, band PNGs, trigger log) and its manifest row.

Objects are written before the row is returned, so a row can only ever name objects that exist.
Whatever a generation mode adds (band images, thoughts, reflections, trigger logs) is written when
present and simply absent when not: plain mode has none of them.
"""
from __future__ import annotations

import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq

from twig_batch.io import layout
from twig_batch.io.manifest import ok_row


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def plain_value(value):
    """Trigger-log values as Parquet can hold them (tensors and numpy scalars become Python numbers)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    return value


def trigger_log_parquet(trigger_log: list[dict]) -> bytes:
    """The controller's fixed columns when the records fit them (so an empty log still has its schema)."""
    from twig_batch.controller.trigger_log import schema

    records = [{str(k): plain_value(v) for k, v in entry.items()} for entry in trigger_log]
    fixed = schema()
    if all(set(record) <= set(fixed.names) for record in records):
        table = pa.Table.from_pylist(records, schema=fixed)
    else:  # a log with extra fields keeps them all
        table = pa.Table.from_pylist(records)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_result(storage, result, model: str, generation_s: float, controller_ran: bool = False) -> dict:
    """Store everything `result` (an ImageResult) holds and return its manifest row.

    With the controller on, every image gets a trigger log, even one with no evaluations.
    """
    start = time.perf_counter()
    request = result.request
    prompt_id, sample = request.prompt_id, request.sample_index
    stages = []
    for position, (label, band_image) in enumerate(result.band_images):
        key = layout.stage_image_key(prompt_id, sample, position, label)
        stages.append((str(label), storage.put(key, png_bytes(band_image))))
    trigger_uri = None
    if result.trigger_log or controller_ran:
        trigger_uri = storage.put(layout.trigger_log_key(prompt_id, sample), trigger_log_parquet(result.trigger_log))
    # The final image goes last: its presence means every other object of this sample is there too.
    image_uri = storage.put(layout.image_key(prompt_id, sample), png_bytes(result.image))
    duration = generation_s + time.perf_counter() - start
    return ok_row(result.record(), model, image_uri, stages, trigger_uri, duration)


def encode_result(result, model: str, generation_s: float) -> dict:
    """For pipelines that keep images in the dataset instead of writing them: the row plus PNG bytes."""
    row = ok_row(result.record(), model, None, [], None, generation_s)
    row["stage_labels"] = [str(label) for label, _ in result.band_images]
    row["image_png"] = png_bytes(result.image)
    row["stage_pngs"] = [png_bytes(image) for _, image in result.band_images]
    row["trigger_log_json"] = None
    if result.trigger_log:
        row["trigger_log_json"] = json.dumps([plain_value(e) for e in result.trigger_log], default=str)
    return row
