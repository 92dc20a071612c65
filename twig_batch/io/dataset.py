"""The input dataset: find its Parquet files, check them once, fingerprint them.

`check_input` reads only file footers and listings, so a bad input is reported in seconds and
before any model is loaded. `read_row_groups` then reads the columns a run uses, one row group at a
time, so that a page that cannot be decoded and repeated ids are found before the run starts too
(about a second per million rows); the run's driver reads them again as it hands out work (`work_feed`).
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from twig_batch.errors import InputError
from twig_batch.io.s3 import S3Endpoint, arrow_filesystem, explain_s3_error, is_s3_uri, new_client, parse_s3_uri

_GLOB_CHARS = "*?["


@dataclass
class InputFiles:
    uri: str
    paths: list[str]  # as the filesystem below names them (local paths, or bucket/key for S3)
    filesystem: object  # a pyarrow filesystem
    display: list[str] = field(default_factory=list)  # how to name each file to a person


@dataclass
class InputSummary:
    rows: int
    has_id_column: bool
    fingerprint: dict
    has_seed_column: bool = False


def resolve_input(uri: str) -> InputFiles:
    """Expand a Parquet file, folder or glob (local or s3://) into a sorted list of files."""
    if is_s3_uri(uri):
        return _resolve_s3(uri)
    if "://" in uri:
        raise InputError(f"unsupported input address {uri!r}: use a local path or s3://bucket/key")
    from pyarrow import fs

    path = Path(uri).expanduser()
    if any(ch in uri for ch in _GLOB_CHARS):
        files = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [str(path)]
    else:
        raise InputError(f"input {uri} does not exist")
    if not files:
        raise InputError(f"input {uri} matches no Parquet files")
    files = [str(Path(f).resolve()) for f in files]
    return InputFiles(uri, files, fs.LocalFileSystem(), files)


def _resolve_s3(uri: str) -> InputFiles:
    location = parse_s3_uri(uri, error=InputError)
    endpoint = S3Endpoint.resolve()
    client = new_client(endpoint)
    pattern = location.key
    glob_at = min((pattern.find(ch) for ch in _GLOB_CHARS if ch in pattern), default=-1)
    listing_prefix = pattern[:glob_at] if glob_at >= 0 else pattern
    try:
        keys = list(_list_keys(client, location.bucket, listing_prefix))
    except Exception as exc:
        raise explain_s3_error(exc, f"cannot list input {uri}", error=InputError) from None
    if glob_at >= 0:
        keys = [k for k in keys if fnmatch.fnmatchcase(k, pattern)]
    elif pattern in keys:
        keys = [pattern]
    else:
        folder = pattern.rstrip("/") + "/" if pattern else ""
        keys = [k for k in keys if k.startswith(folder) and k.endswith(".parquet")]
    if not keys:
        raise InputError(f"input {uri} matches no Parquet objects")
    keys.sort()
    return InputFiles(uri, [f"{location.bucket}/{k}" for k in keys], arrow_filesystem(endpoint),
                      [f"s3://{location.bucket}/{k}" for k in keys])


def _list_keys(client, bucket: str, prefix: str):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield item["Key"]


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def check_input(files: InputFiles, prompt_column: str, id_column: str, id_column_required: bool,
                seed_column: str | None = None, seed_column_required: bool = False) -> InputSummary:
    """Read every footer: the prompt column must exist and hold text; ids must be text or integers;
    seeds (when `seed_column` is present) integers; and the input must hold at least one row."""
    rows = 0
    id_presence = set()
    seed_presence = set()
    digest = hashlib.sha256()
    total_bytes = 0
    for path, name in zip(files.paths, files.display):
        try:
            info = files.filesystem.get_file_info(path)
        except Exception as exc:
            raise InputError(f"cannot read {name}: {exc}") from None
        if info.size == 0:  # pyarrow's own message for this is about footers and magic bytes
            raise InputError(f"{name} is empty (0 bytes), not a Parquet file")
        try:
            with files.filesystem.open_input_file(path) as handle:
                metadata = pq.ParquetFile(handle).metadata
                schema = metadata.schema.to_arrow_schema()
        except Exception as exc:  # unreadable, not Parquet, no permission: one message naming the file
            raise InputError(f"cannot read {name} as Parquet: {exc}") from None
        if prompt_column not in schema.names:
            raise InputError(f"{name} has no column {prompt_column!r} (columns: {', '.join(schema.names)}); "
                             "choose the prompt column with --prompt-column")
        kind = schema.field(prompt_column).type
        if not (_is_text(kind) or pa.types.is_null(kind)):
            raise InputError(f"column {prompt_column!r} in {name} holds {kind}, not text")
        present = id_column in schema.names
        if present:
            kind = schema.field(id_column).type
            if not (_is_text(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind)):
                raise InputError(f"id column {id_column!r} in {name} holds {kind}; ids must be text or integers")
        elif id_column_required:
            raise InputError(f"{name} has no id column {id_column!r} (columns: {', '.join(schema.names)})")
        id_presence.add(present)
        seed_presence.add(_check_seed_column(schema, name, seed_column, seed_column_required))
        rows += metadata.num_rows
        total_bytes += info.size or 0
        digest.update(f"{name}\x1f{info.size}\x1f{info.mtime_ns}\x1f{metadata.num_rows}\n".encode())
    if len(id_presence) > 1:
        raise InputError(f"some input files have the id column {id_column!r} and some do not; make them agree")
    if len(seed_presence) > 1:
        raise InputError(f"some input files have the seed column {seed_column!r} and some do not; make them agree")
    if rows == 0:
        raise InputError(f"input {files.uri} holds no rows ({len(files.paths)} file(s), 0 rows): nothing to draw")
    fingerprint = {"uri": files.uri, "files": len(files.paths), "rows": rows, "bytes": total_bytes,
                   "sha256": digest.hexdigest(), "first_files": files.display[:20]}
    return InputSummary(rows=rows, has_id_column=id_presence == {True}, fingerprint=fingerprint,
                        has_seed_column=seed_presence == {True})


def _check_seed_column(schema: pa.Schema, name: str, seed_column: str | None, required: bool) -> bool:
    """Whether the file has the seed column; its type must be an integer (values are checked per row)."""
    if not seed_column or seed_column not in schema.names:
        if seed_column and required:
            raise InputError(f"{name} has no seed column {seed_column!r} (columns: {', '.join(schema.names)})")
        return False
    kind = schema.field(seed_column).type
    if pa.types.is_integer(kind) or pa.types.is_null(kind):
        return True
    hint = ""
    if pa.types.is_floating(kind):  # pandas stores an integer column with gaps as float64
        hint = " (pandas turns integers with missing values into floats; store them as Int64)"
    raise InputError(f"seed column {seed_column!r} in {name} holds {kind}; seeds must be integers{hint}. "
                     "Choose another column with --seed-column, or pass --seed-column '' to ignore it")


@dataclass(frozen=True, slots=True)
class RowGroup:
    """One row group of one input file, as read: where it lies and its rows' columns."""

    file: int  # index into InputFiles.paths
    index: int  # row group number within the file
    first_row: int  # its first row's number within the file
    table: pa.Table


def read_row_groups(files: InputFiles, columns: list[str], only: set | None = None):
    """Every row group of every file (or `only` those (file, row group)), in order, with only `columns`:
    one at a time, so memory stays flat.

    A page that cannot be decoded (a corrupted file whose footer is intact) stops here, before any
    model loads, with one message naming the file, the row group, its rows and the cause: a run never
    starts on an input it cannot read whole.
    """
    for number, (path, name) in enumerate(zip(files.paths, files.display)):
        try:
            handle = files.filesystem.open_input_file(path)
            parquet = pq.ParquetFile(handle)
        except Exception as exc:
            raise InputError(f"cannot read {name} as Parquet: {exc}") from None
        with handle:
            first_row = 0
            for index in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(index).num_rows
                if only is not None and (number, index) not in only:
                    first_row += rows
                    continue
                try:
                    table = parquet.read_row_group(index, columns=columns)  # decodes every page
                except Exception as exc:
                    raise InputError(
                        f"{name}: row group {index} of {parquet.num_row_groups} (rows {first_row}.."
                        f"{first_row + rows - 1}) cannot be read: {type(exc).__name__}: {exc}. Nothing was drawn; "
                        "rewrite the file or leave it out of the input, and run again") from None
                yield RowGroup(number, index, first_row, table)
                first_row += rows


def check_unique_ids(files: InputFiles, id_column: str) -> None:
    """Two rows with one id would write one image key: refuse the input (see `refuse_repeated_ids`)."""
    sizes = [0] * len(files.paths)
    chunks = []
    for group in read_row_groups(files, [id_column]):
        chunks.append(group.table.column(id_column))
        sizes[group.file] += group.table.num_rows
    refuse_repeated_ids(chunks, sizes, files.display, id_column)


def refuse_repeated_ids(columns: list, sizes: list[int], names: list[str], id_column: str) -> None:
    """Two rows with one id would write one image key: refuse the input, naming the id and both rows.

    `columns` are the id column's pieces in input order, `sizes` each file's rows. Null and blank ids
    are left out: those rows get ids made from their prompts, and rows with the same prompt then
    rightly share one image.
    """
    chunks = [chunk for column in columns for chunk in pc.cast(column, pa.string()).chunks]  # 7 and "7" are one id
    ids = pa.chunked_array(chunks, type=pa.string())
    named = pc.and_(pc.is_valid(ids), pc.not_equal(pc.utf8_trim_whitespace(ids), ""))
    named = pc.fill_null(named, False)
    if pc.count_distinct(ids.filter(named)).as_py() == pc.sum(named).as_py():
        return  # the common case, decided without building a table of counts
    counts = pa.table({"id": ids.filter(named)}).group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts.column("id_count"), 1)).column("id")[0].as_py()
    first, second = pc.indices_nonzero(pc.and_(named, pc.equal(ids, repeated))).to_pylist()[:2]
    where = [_row_in_file(position, sizes, names) for position in (first, second)]
    if where[0][1] == where[1][1]:
        place = f"rows {where[0][0]} and {where[1][0]} of {where[0][1]}"
    else:
        place = f"row {where[0][0]} of {where[0][1]} and row {where[1][0]} of {where[1][1]}"
    more = pc.sum(pc.greater(counts.column("id_count"), 1)).as_py() - 1
    raise InputError(f"id {repeated!r} in column {id_column!r} is on {place} (rows count from 0)"
                     + (f", and {more} more id(s) repeat" if more else "")
                     + "; ids name the output images, so each must be unique")


def _row_in_file(position: int, sizes: list[int], names: list[str]) -> tuple[int, str]:
    for size, name in zip(sizes, names):
        if position < size:
            return position, name
        position -= size
    raise IndexError(position)
