"""The input dataset: find its Parquet files, check them once, fingerprint them.

Everything here reads only file footers and listings, so a bad input is reported in seconds and
before any model is loaded. The rows themselves are read later, in parallel, by Ray Data.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
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


def check_input(files: InputFiles, prompt_column: str, id_column: str, id_column_required: bool) -> InputSummary:
    """Read every footer: the prompt column must exist and hold text; ids must be text or integers."""
    rows = 0
    id_presence = set()
    digest = hashlib.sha256()
    total_bytes = 0
    for path, name in zip(files.paths, files.display):
        try:
            info = files.filesystem.get_file_info(path)
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
        rows += metadata.num_rows
        total_bytes += info.size or 0
        digest.update(f"{name}\x1f{info.size}\x1f{info.mtime_ns}\x1f{metadata.num_rows}\n".encode())
    if len(id_presence) > 1:
        raise InputError(f"some input files have the id column {id_column!r} and some do not; make them agree")
    fingerprint = {"uri": files.uri, "files": len(files.paths), "rows": rows, "bytes": total_bytes,
                   "sha256": digest.hexdigest(), "first_files": files.display[:20]}
    return InputSummary(rows=rows, has_id_column=id_presence == {True}, fingerprint=fingerprint)
