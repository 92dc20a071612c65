"""`twig-batch generate`'s output: a run of one attempt, written as the batch job writes its own.

The same layout, artifact writer, manifest, run.json and completion marker, so `twig-batch verify`
and `twig-batch report` read it as they read a batch run. Its run.json says `"command": "generate"`
and its input is the one prompt. Generating into the same folder again replaces the earlier
`generate` run there (as its files were simply written over before); a batch run is never touched.
"""
from __future__ import annotations

from twig_batch.errors import OutputError
from twig_batch.io import layout
from twig_batch.io.artifacts import write_result
from twig_batch.io.earlier_run import clear_run
from twig_batch.io.manifest import ManifestJournal, consolidate, manifest_totals, rows_to_table
from twig_batch.io.run_info import (new_attempt_id, read_run_info, record_complete, software_versions, utc_now,
                                    write_run_info)

COMMAND = "generate"


def check_destination(storage) -> str | None:
    """Before anything is drawn: refuse a folder holding a batch run; say when an earlier `generate`
    run there is to be replaced (None when the folder holds no run)."""
    storage.check_writable()
    earlier = read_run_info(storage)
    if earlier is None:
        return None
    if earlier.get("command") != COMMAND:
        raise OutputError(f"{storage.root_uri} holds a batch run (twig-batch run); generate writes a run of its own: "
                          "choose another --out")
    return f"replacing the earlier generate run in {storage.root_uri}"


def write_generated_run(storage, results: list, identity: dict, prompt: str, attempt_record: dict,
                        generation_s: float, controller_ran: bool) -> dict:
    """Store `results` (ImageResults of one prompt) with their records; returns the completion summary."""
    clear_run(storage)
    attempt = new_attempt_id()
    info = {**identity, "command": COMMAND, "created_at": utc_now(), "output": storage.root_uri, "status": "running",
            "input": {"prompt": prompt}, "samples_per_prompt": len(results), "versions": software_versions(),
            "attempts": [{"attempt": attempt, "started_at": utc_now(), "resumed": False, **attempt_record}]}
    write_run_info(storage, info)
    share = generation_s / max(1, len(results))
    rows = [write_result(storage, result, identity["model"], share, controller_ran=controller_ran)
            for result in results]
    journal = ManifestJournal(storage, attempt)
    journal.add(rows_to_table(rows))
    journal.flush()
    totals = manifest_totals(consolidate(storage))
    summary = {"ok": len(rows), "errors": 0, "elapsed_s": round(generation_s, 3),
               "images_per_s": round(len(rows) / generation_s, 4) if generation_s > 0 else None, **totals,
               "images": storage.uri(layout.IMAGES_DIR), "manifest": storage.uri(layout.MANIFEST)}
    info["attempts"][-1].update(finished_at=utc_now(), ok=len(rows), errors=0, skipped=0)
    record_complete(storage, info, summary)
    return summary
