"""`twig-batch verify`: check a finished (or partial) run in DEST against its own records and its input.

What is checked, without loading a model or Ray:

- every ok row's objects (final image, band images, trigger log) are inside DEST, sit at the
  layout's key for that (id, sample), exist, and decode (PNG through Pillow, trigger logs as Parquet);
- each (id, sample) is recorded once: never twice in manifest.parquet, never ok twice across the
  manifest and the journal parts (a retried error row is the normal resume, not a duplicate);
- with an input, the run's expansion of it (the prompt and id columns and the samples per prompt
  recorded in run.json) against the recorded keys: missing and unexpected (id, sample);
- the completion marker: present, and consistent with run.json and the manifest.

Rows are read in batches and objects are fetched by a small thread pool a chunk at a time, so a
run of any size is checked in bounded memory; only the set of recorded keys is kept.
"""
from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from twig_batch.errors import InputError
from twig_batch.io import layout
from twig_batch.io.manifest import item_key
from twig_batch.io.row_errors import common_causes
from twig_batch.io.storage import check_key, read_destination

ROW_COLUMNS = ["id", "sample_index", "status", "error", "image_uri", "stage_image_uris", "trigger_log_uri"]
PROBLEMS_PER_KIND = 20  # enough to see the pattern; the rest of a kind is counted, not listed
FETCH_THREADS = 8
ROWS_PER_CHUNK = 256  # rows whose objects are in flight at once


@dataclass
class VerifyReport:
    dest: str
    problems: list[str] = field(default_factory=list)  # listed problems, then one "... more" line per capped kind
    problem_count: int = 0  # every problem found, listed or not
    complete: bool = False
    manifest_rows: int = 0  # rows in manifest.parquet
    journal_rows: int = 0  # rows in journal parts
    items: int = 0  # distinct (id, sample) recorded
    ok_rows: int = 0  # distinct (id, sample) with an ok row
    error_rows: int = 0  # distinct (id, sample) with only error rows
    duplicate_rows: int = 0
    expected_items: int | None = None  # with an input: (id, sample) its expansion yields
    missing_items: int | None = None
    unexpected_items: int | None = None
    error_causes: list = field(default_factory=list)  # the error rows' most common reasons: (example, rows)
    images_checked: int = 0
    trigger_logs_checked: int = 0
    _listed: dict = field(default_factory=dict, repr=False)  # kind -> problems listed so far
    _left_out: dict = field(default_factory=dict, repr=False)  # kind -> problems counted only

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def problem(self, kind: str, message: str) -> None:
        self.problem_count += 1
        if self._listed.get(kind, 0) < PROBLEMS_PER_KIND:
            self._listed[kind] = self._listed.get(kind, 0) + 1
            self.problems.append(message)
        else:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1

    def close(self) -> "VerifyReport":
        self.problems += [f"... and {count} more: {kind}" for kind, count in self._left_out.items()]
        self._left_out = {}
        return self


def describe(prompt_id: str, sample_index: int) -> str:
    return f"(id={prompt_id!r}, sample={sample_index})"


def verify_output(dest: str, input: str | None = None, expand=None) -> VerifyReport:
    """Check DEST (a local folder or s3://bucket/prefix); raises TwigBatchError when DEST is not a run.

    With an input, `expand(input, info)` gives the (id, sample) keys the run makes of it from its
    run.json `info`: the batch job's own expansion, passed down from the layer that owns it
    (`distributed.verify_run.verify_run` is this check with it).
    """
    if input is not None and expand is None:
        raise ValueError("checking against an input needs the run's expansion of it (expand)")
    return read_destination(dest, lambda storage: _verify(storage, input, expand).close(), "verify")


def _verify(storage, input: str | None, expand) -> VerifyReport:
    report = VerifyReport(storage.root_uri)
    info = _read_json(storage, layout.RUN_INFO, report)
    journal = [k for k in storage.list(layout.JOURNAL_DIR) if k.endswith(".parquet")]
    has_manifest = storage.exists(layout.MANIFEST)
    if info is None and not has_manifest and not journal:
        raise InputError(f"{storage.root_uri} holds no twig-batch run (no {layout.RUN_INFO} and no manifest)")
    if info is None:
        report.problem("run.json", f"{layout.RUN_INFO} is missing or unreadable")
    recorded = _check_rows(storage, info or {}, has_manifest, journal, report)
    _check_completion(storage, info, journal, has_manifest, report)
    if input is not None:
        _check_against_input(input, expand, info, recorded, report)
    return report


def _read_json(storage, key: str, report: VerifyReport) -> dict | None:
    if not storage.exists(key):
        return None
    try:
        value = json.loads(storage.get(key))
    except ValueError as exc:
        report.problem(key, f"{key} is not valid JSON ({exc})")
        return None
    if not isinstance(value, dict):
        report.problem(key, f"{key} holds {type(value).__name__}, not an object")
        return None
    return value


# ---- the rows and their objects ----

def _row_batches(storage, key: str, report: VerifyReport):
    """Rows of one manifest or journal part, a few thousand at a time."""
    try:
        parquet = pq.ParquetFile(io.BytesIO(storage.get(key)))
        missing = [c for c in ROW_COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            report.problem(key, f"{key} lacks manifest columns {', '.join(missing)}")
            return
        for batch in parquet.iter_batches(batch_size=4096, columns=ROW_COLUMNS):
            yield batch.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        report.problem(key, f"{key} cannot be read as Parquet ({exc})")


class _Tally:
    """Every (id, sample) seen, and what makes a repeat a duplicate.

    The final manifest holds each key once. Across the manifest and the journal a key may be
    recorded again only after an error row (a resume retries those); an ok row for a key that is
    already ok means the exactly-once guarantee broke.
    """

    def __init__(self, report: VerifyReport):
        self.report = report
        self.recorded: set[str] = set()
        self.ok: set[str] = set()
        self.in_manifest: set[str] = set()
        self.errors: dict[str, str] = {}  # key -> reason, for keys with no ok row so far

    def first_ok(self, source: str, row: dict) -> bool:
        """Count one row; True when it is the first ok row of its key (its objects are checked then)."""
        report = self.report
        if source == layout.MANIFEST:
            report.manifest_rows += 1
        else:
            report.journal_rows += 1
        if not isinstance(row["id"], str) or not isinstance(row["sample_index"], int) or row["sample_index"] < 0:
            report.problem("bad key", f"a row in {source} has no usable key (id={row['id']!r}, "
                                      f"sample={row['sample_index']!r})")
            return False
        key = item_key(row["id"], row["sample_index"])
        repeated_ok = row["status"] == "ok" and key in self.ok
        if source == layout.MANIFEST and key in self.in_manifest:
            self._duplicate(row, f"twice in {layout.MANIFEST}")
        elif repeated_ok:
            self._duplicate(row, f"recorded ok again in {source}")
        if source == layout.MANIFEST:
            self.in_manifest.add(key)
        self.recorded.add(key)
        if row["status"] != "ok" and key not in self.ok:
            self.errors[key] = row["error"]
        if row["status"] != "ok" or repeated_ok:
            return False
        self.ok.add(key)
        self.errors.pop(key, None)
        return True

    def _duplicate(self, row: dict, where: str) -> None:
        self.report.duplicate_rows += 1
        self.report.problem("duplicate rows", f"duplicate row {describe(row['id'], row['sample_index'])}: {where}")


def _check_rows(storage, info: dict, has_manifest: bool, journal: list[str], report: VerifyReport) -> set[str]:
    """Count and deduplicate every recorded row, checking each ok item's objects once. Returns the keys."""
    tally = _Tally(report)
    # Where the run was written: a run copied or synced elsewhere still names its objects by that root.
    roots = [storage.root_uri] + ([info["output"]] if isinstance(info.get("output"), str) else [])
    getattr(storage, "client", None)  # one S3 client, made before the threads share it
    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        pending: list[dict] = []
        for source in ([layout.MANIFEST] if has_manifest else []) + journal:
            for rows in _row_batches(storage, source, report):
                pending += [row for row in rows if tally.first_ok(source, row)]
                while len(pending) >= ROWS_PER_CHUNK:
                    _check_objects(pool, storage, roots, pending[:ROWS_PER_CHUNK], report)
                    pending = pending[ROWS_PER_CHUNK:]
        _check_objects(pool, storage, roots, pending, report)
    report.items, report.ok_rows = len(tally.recorded), len(tally.ok)
    report.error_rows = report.items - report.ok_rows
    report.error_causes = common_causes(tally.errors.values())
    return tally.recorded


def _check_objects(pool, storage, roots: list[str], rows: list[dict], report: VerifyReport) -> None:
    for found, images, logs in pool.map(lambda row: _row_objects(storage, roots, row), rows):
        report.images_checked += images
        report.trigger_logs_checked += logs
        for kind, message in found:
            report.problem(kind, message)


def _row_objects(storage, roots: list[str], row: dict) -> tuple[list[tuple[str, str]], int, int]:
    """One ok row: (problems as (kind, message), images decoded, trigger logs read)."""
    prompt_id, sample = row["id"], row["sample_index"]
    who = describe(prompt_id, sample)
    stem = layout.sample_stem(prompt_id, sample)
    wanted = [("image", row["image_uri"], lambda key: key == layout.image_key(prompt_id, sample), _decode_png)]
    for position, uri in enumerate(row["stage_image_uris"] or []):
        wanted.append((f"stage image {position}", uri,
                       lambda key, p=position: key.startswith(f"{stem}.stage-{p:02d}-") and key.endswith(".png"),
                       _decode_png))
    if row["trigger_log_uri"]:
        wanted.append(("trigger log", row["trigger_log_uri"],
                       lambda key: key == layout.trigger_log_key(prompt_id, sample), _read_trigger_log))
    problems, images, logs = [], 0, 0
    for what, uri, is_its_key, decode in wanted:
        if not uri:
            problems.append((f"{_kind(what)} missing", f"{who}: ok row has no {what} URI"))
            continue
        key = object_key(roots, uri)
        if key is None:
            problems.append(("outside DEST", f"{who}: {what} {uri} is outside DEST"))
            continue
        if not is_its_key(key):
            problems.append(("wrong key", f"{who}: {what} {uri} is not this item's key in the output layout"))
            continue
        try:
            data = storage.get(key)
        except FileNotFoundError:
            problems.append((f"{_kind(what)} missing", f"{who}: {what} {uri} does not exist"))
            continue
        except OSError as exc:  # a folder where the file should be, no permission
            reason = exc.strerror or exc
            problems.append((f"{_kind(what)} unreadable", f"{who}: {what} {uri} cannot be read ({reason})"))
            continue
        error = decode(data)
        if what == "trigger log":
            logs += 1
        else:
            images += 1
        if error:
            problems.append((f"{_kind(what)} unreadable", f"{who}: {what} {uri} is unreadable ({error})"))
    return problems, images, logs


def _kind(what: str) -> str:
    """Problems are capped per kind; all band images share one kind whatever their position."""
    return what.rstrip("0123456789 ")


def object_key(roots: list[str], uri: str) -> str | None:
    """The key under DEST a manifest URI names, or None when it points anywhere else."""
    for root in roots:
        prefix = root.rstrip("/") + "/"
        if uri.startswith(prefix):
            try:
                return check_key(uri[len(prefix):])  # `DEST/images/../../x` starts with DEST but is not in it
            except ValueError:
                return None
    return None


def _decode_png(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                return f"a {image.format} image, not PNG"
            image.verify()  # chunk checksums; it leaves the image unusable, hence the second open
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # every pixel decodes: catches a file cut short after valid chunks
    except Exception as exc:  # Pillow raises many types for bad data
        return f"{type(exc).__name__}: {exc}"
    return None


def _read_trigger_log(data: bytes) -> str | None:
    try:
        pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# ---- the completion marker ----

def _check_completion(storage, info: dict | None, journal: list[str], has_manifest: bool,
                      report: VerifyReport) -> None:
    status = (info or {}).get("status")
    if not storage.exists(layout.COMPLETE_MARKER):
        report.problem("not complete", f"not complete: no {layout.COMPLETE_MARKER} "
                                       f"({layout.RUN_INFO} status {status!r}); finish it with --resume")
        return
    marker = _read_json(storage, layout.COMPLETE_MARKER, report)
    if marker is None:
        return
    found = []
    if status != "complete":
        found.append(f"{layout.COMPLETE_MARKER} is present but {layout.RUN_INFO} status is {status!r}")
    last_attempt = ((info or {}).get("attempts") or [{}])[-1].get("attempt")
    if info is not None and marker.get("attempt") != last_attempt:
        found.append(f"{layout.COMPLETE_MARKER} names attempt {marker.get('attempt')!r}, but the last attempt "
                     f"in {layout.RUN_INFO} is {last_attempt!r}")
    if journal:
        found.append(f"complete, yet {len(journal)} journal part(s) were never folded into {layout.MANIFEST}")
    if not has_manifest:
        found.append(f"complete, yet there is no {layout.MANIFEST}")
    elif marker.get("manifest_rows") != report.manifest_rows:
        found.append(f"{layout.COMPLETE_MARKER} counts {marker.get('manifest_rows')} manifest rows, "
                     f"{layout.MANIFEST} holds {report.manifest_rows}")
    for message in found:
        report.problem("marker", message)
    report.complete = not found


# ---- against the input ----

def _check_against_input(input: str, expand, info: dict | None, recorded: set[str], report: VerifyReport) -> None:
    if not info or not info.get("prompt_column") or not info.get("samples_per_prompt"):
        report.problem("input", f"cannot compare with {input}: {layout.RUN_INFO} does not say how the run "
                                "expanded its input")
        return
    expected = expand(input, info)
    report.expected_items = len(expected)
    missing = sorted(expected - recorded)
    unexpected = sorted(recorded - expected)
    report.missing_items, report.unexpected_items = len(missing), len(unexpected)
    for key in missing:
        report.problem("missing items", f"missing {describe(*_split(key))}: in the input, not in the manifest")
    for key in unexpected:
        report.problem("unexpected items", f"unexpected {describe(*_split(key))}: in the manifest, not in the input")


def _split(key: str) -> tuple[str, int]:
    prompt_id, _, sample = key.rpartition("\x1f")  # ids may hold anything; the sample never holds \x1f
    return prompt_id, int(sample)
