import random
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq

from twig_batch.io import layout
from twig_batch.io.manifest import (SCHEMA, ManifestJournal, consolidate, deduplicate, error_row, ok_keys,
                                    read_recorded, rows_to_table)
from twig_batch.io.storage import LocalStorage

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(prompt_id, sample, status, at, storage=None):
    if status == "error":
        r = error_row(prompt_id, "p", sample, 1, "plain", "tiny", "boom")
    else:
        r = error_row(prompt_id, "p", sample, 1, "plain", "tiny", "")
        key = layout.image_key(prompt_id, sample)
        uri = storage.put(key, b"png") if storage else key
        r.update(status="ok", error=None, image_uri=uri)
    r["finished_at"] = T0 + timedelta(seconds=at)
    return r


def test_schema_has_the_documented_columns():
    required = {"id", "prompt", "sample_index", "seed", "mode", "model", "status", "error", "image_uri",
                "stage_image_uris", "thoughts", "reflection_scores", "redrawn_bands", "n_triggers", "n_injections",
                "trigger_log_uri", "duration_s"}
    assert required <= set(SCHEMA.names)


def test_deduplicate_prefers_ok_then_newest():
    table = rows_to_table([row("a", 0, "error", 1), row("a", 0, "ok", 2), row("a", 0, "error", 3),
                           row("b", 0, "ok", 1), row("b", 0, "ok", 5), row("b", 1, "error", 1),
                           row("b", 1, "error", 4)])
    merged = deduplicate(table).to_pylist()
    assert [(r["id"], r["sample_index"], r["status"]) for r in merged] == [("a", 0, "ok"), ("b", 0, "ok"),
                                                                          ("b", 1, "error")]
    assert merged[1]["finished_at"] == T0 + timedelta(seconds=5)
    assert merged[2]["finished_at"] == T0 + timedelta(seconds=4)


def test_journal_flushes_by_rows_and_consolidate_folds_it(tmp_path):
    store = LocalStorage(tmp_path)
    journal = ManifestJournal(store, "attempt1", flush_rows=2, flush_seconds=3600)
    journal.add(rows_to_table([row("a", 0, "ok", 1, store)]))
    assert store.list(layout.JOURNAL_DIR) == []
    journal.add(rows_to_table([row("b", 0, "error", 1)]))
    assert len(store.list(layout.JOURNAL_DIR)) == 1
    journal.add(rows_to_table([row("b", 0, "ok", 2, store)]))
    journal.flush()
    assert ok_keys(store) == {"a\x1f0", "b\x1f0"}
    merged = consolidate(store)
    assert merged.num_rows == 2 and store.list(layout.JOURNAL_DIR) == []
    assert pq.read_table(tmp_path / "manifest.parquet").num_rows == 2
    assert consolidate(store).to_pylist() == merged.to_pylist()  # idempotent


def test_any_sequence_of_crashes_and_resumes_keeps_each_key_once(tmp_path):
    """Random attempts, each drawing some keys, flushing some parts, maybe crashing before or during folding."""
    rng = random.Random(7)
    keys = [(f"id{i}", s) for i in range(12) for s in range(2)]
    for trial in range(10):
        store = LocalStorage(tmp_path / f"trial{trial}")
        clock = 0
        for attempt in range(rng.randint(1, 5)):
            done = ok_keys(store)
            todo = [k for k in keys if f"{k[0]}\x1f{k[1]}" not in done]
            journal = ManifestJournal(store, f"a{attempt}", flush_rows=rng.randint(1, 6), flush_seconds=3600)
            crash_after = rng.randint(0, len(todo)) if rng.random() < 0.7 else len(todo)
            for prompt_id, sample in todo[:crash_after]:
                clock += 1
                status = "error" if rng.random() < 0.2 else "ok"
                journal.add(rows_to_table([row(prompt_id, sample, status, clock, store)]))
            if crash_after == len(todo):
                journal.flush()
                if rng.random() < 0.5:
                    consolidate(store)
            # else: crashed, unflushed rows are lost (their images may exist; nothing names them)
        final = consolidate(store)
        seen = [(r["id"], r["sample_index"]) for r in final.to_pylist()]
        assert len(seen) == len(set(seen))
        for r in final.to_pylist():
            if r["status"] == "ok":
                assert (tmp_path / f"trial{trial}" / layout.image_key(r["id"], r["sample_index"])).is_file()
        recorded, journal_keys = read_recorded(store)
        assert journal_keys == [] and recorded.num_rows == final.num_rows
