"""What a destination already holds, and whether a new run may continue, restart or replace it.

A run that recorded images is never written over by accident: only `--resume` (same model, mode,
settings, seed, columns and templates) continues it, only `--overwrite` replaces it. A run that
recorded no image (its first attempt failed: a wrong `--model`, a dead cluster) holds nothing to
keep, so a new run restarts it with whatever options it is given; `--resume` with the same options
continues it instead, keeping its earlier attempts on record.
"""
from __future__ import annotations

from dataclasses import dataclass

from twig_batch.errors import OutputError, TwigBatchError
from twig_batch.io import layout
from twig_batch.io.manifest import ok_keys
from twig_batch.io.run_info import check_resume_matches, read_run_info


@dataclass(frozen=True, slots=True)
class EarlierRun:
    info: dict | None  # run.json of the run to continue; None: a new run
    skip: frozenset  # (id, sample) keys recorded ok: what a resume does not draw again
    replaced: str | None = None  # why an earlier run is cleared before this one starts, or None

    def describe(self, where: str) -> str | None:
        return f"replacing the earlier run in {where}: {self.replaced}" if self.replaced else None


def earlier_run(storage, identity: dict, resume: bool, overwrite: bool) -> EarlierRun:
    """Decide, before anything is written, what becomes of the run already in `storage`."""
    previous = read_run_info(storage)
    if previous is None:
        return EarlierRun(None, frozenset())
    drawn = frozenset(ok_keys(storage))
    if overwrite:
        return EarlierRun(None, frozenset(), f"--overwrite ({len(drawn)} image(s) recorded; all removed)")
    if not drawn:
        if resume and _same_run(previous, identity, storage.root_uri):  # its attempts stay on record
            return EarlierRun(previous, drawn)
        return EarlierRun(None, frozenset(), "it recorded no image, so it starts afresh with these options")
    if not resume:
        raise OutputError(f"{storage.root_uri} already holds a twig-batch run; pass --resume to continue it "
                          f"({len(drawn)} image(s) recorded), --overwrite to replace it, or choose a new output "
                          "destination")
    check_resume_matches(previous, identity, storage.root_uri)
    return EarlierRun(previous, drawn)


def clear_run(storage) -> int:
    """Remove a run's records and objects (run.json last), for one that is replaced; returns the count."""
    keys = [key for prefix in (layout.IMAGES_DIR, layout.JOURNAL_DIR) for key in storage.list(prefix)]
    keys += [key for key in (layout.COMPLETE_MARKER, layout.MANIFEST, layout.RUN_INFO) if storage.exists(key)]
    for key in keys:
        storage.delete(key)
    return len(keys)


def _same_run(previous: dict, identity: dict, where: str) -> bool:
    try:
        check_resume_matches(previous, identity, where)
    except TwigBatchError:
        return False
    return True
