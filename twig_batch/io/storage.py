"""Where outputs go: a local folder or an S3 prefix, behind one small interface.

Every write is all-or-nothing so a crash never leaves a half object behind a manifest row:
locally a temporary file in the same folder is renamed over the target (atomic on POSIX);
on S3 an object is one PUT, which S3 makes visible whole or not at all.

Calls that fail for a passing reason (S3 throttling and 5xx, dropped connections, a network mount's
EIO) are retried with backoff (`retry.RetryPolicy`); rewriting an object is harmless because every
write replaces the whole object.
"""
from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path, PurePosixPath

from twig_batch.errors import DestinationFullError, OutputError
from twig_batch.io.layout import PROBE_PREFIX, RESERVE_FILE
from twig_batch.io.retry import DEFAULT_POLICY, call_with_retries
from twig_batch.io.s3 import S3Endpoint, explain_s3_error, is_s3_uri, new_client, parse_s3_uri


_FULL = (errno.ENOSPC, errno.EDQUOT)  # the disk is full, or the user's quota on it is spent
RESERVE_BYTES = 2 * 1024 * 1024  # a journal part of a few thousand rows, and run.json


def check_key(key: str) -> str:
    """Keys come from the layout module; this is the last line of defence against escaping DEST."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"unsafe storage key {key!r}")
    return key


class LocalStorage:
    retry_policy = DEFAULT_POLICY
    retry_watcher = None  # hears of retries (see `retry.call_with_retries`); the batch job sets one
    inject_write_fault = None  # fault injection (`twig_batch.distributed.faults`) sets a callable run before each write

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    @property
    def root_uri(self) -> str:
        return str(self.root)

    def uri(self, key: str) -> str:
        return str(self.root / check_key(key))

    def put(self, key: str, data: bytes) -> str:
        target = self.root / check_key(key)
        return call_with_retries(lambda: self._put_once(key, target, data), self.retry_policy,
                                 watcher=self.retry_watcher)

    def _put_once(self, key: str, target: Path, data: bytes) -> str:
        if self.inject_write_fault is not None:
            self.inject_write_fault(key)
        self._check_inside(key, target.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._check_inside(key, target.parent)  # again: a link may have been planted in between
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(staging, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, target)
        except BaseException as exc:
            staging.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in _FULL:  # not this object's problem: every write fails now
                raise DestinationFullError(f"cannot write to {self.root}: {exc.strerror} (writing {key})") from None
            raise
        return str(target)

    def hold_reserve(self) -> bool:
        """Keep a little space (`RESERVE_BYTES`, at most 5% of the disk) for the records of a run that
        fills its disk: once no image fits, the journal and run.json still must (see `release_reserve`).
        False when the disk has no room for it already."""
        stats = os.statvfs(self.root)
        size = min(RESERVE_BYTES, stats.f_frsize * stats.f_blocks // 20)
        try:
            with open(self.root / RESERVE_FILE, "wb") as handle:
                handle.write(b"\0" * size)  # written, not sparse: the blocks are really taken
                os.fsync(handle.fileno())
        except OSError:
            (self.root / RESERVE_FILE).unlink(missing_ok=True)
            return False
        return True

    def release_reserve(self) -> bool:
        """Give the reserved space back; True when there was any."""
        path = self.root / RESERVE_FILE
        held = path.exists()
        path.unlink(missing_ok=True)
        return held

    def _check_inside(self, key: str, folder: Path) -> None:
        """Keys are safe by construction, but a symbolic link planted inside DEST could still lead a
        write outside it; the deepest existing folder on the way must resolve to inside DEST."""
        existing = folder
        while not existing.exists() and existing != self.root:
            existing = existing.parent
        if not existing.resolve().is_relative_to(self.root):
            raise OutputError(f"refusing to write {key}: a symbolic link in {self.root} leads outside it")

    def get(self, key: str) -> bytes:
        return (self.root / check_key(key)).read_bytes()

    def exists(self, key: str) -> bool:
        return (self.root / check_key(key)).is_file()

    def list(self, prefix: str) -> list[str]:
        folder = self.root / check_key(prefix)
        if not folder.is_dir():
            return []
        return sorted(str(p.relative_to(self.root).as_posix()) for p in folder.rglob("*")
                      if p.is_file() and not p.name.endswith(".tmp"))

    def remove_staging_leftovers(self) -> int:
        """Delete half-written staging files a killed writer left behind; call when no writer runs."""
        leftovers = [p for p in self.root.rglob(".*.tmp") if p.is_file()]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def delete(self, key: str) -> None:
        path = self.root / check_key(key)
        path.unlink(missing_ok=True)
        for folder in path.parents:  # drop folders the deletion emptied (the journal), never the root
            if folder == self.root:
                break
            try:
                folder.rmdir()
            except OSError:
                break

    def check_writable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"output {self.root} exists and is not a folder")
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.put(probe, b"probe")
            self.delete(probe)
        except OSError as exc:
            raise OutputError(f"cannot write to output folder {self.root}: {exc.strerror or exc}") from None


class S3Storage:
    retry_policy = DEFAULT_POLICY
    # An object store does not fill up: no space to hold in reserve.
    hold_reserve = staticmethod(lambda: True)  # nothing to keep: an object store does not fill
    release_reserve = staticmethod(lambda: False)
    retry_watcher = None  # hears of retries (see `retry.call_with_retries`); the batch job sets one

    def __init__(self, uri: str, endpoint: S3Endpoint | None = None):
        location = parse_s3_uri(uri, error=OutputError)
        self.bucket = location.bucket
        self.prefix = location.key.strip("/")
        self.endpoint = endpoint or S3Endpoint.resolve()
        self._client = None

    def __getstate__(self):  # boto3 clients do not pickle; each Ray worker makes its own
        return {"bucket": self.bucket, "prefix": self.prefix, "endpoint": self.endpoint, "_client": None,
                "retry_policy": self.retry_policy}

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def client(self):
        if self._client is None:
            self._client = new_client(self.endpoint)
        return self._client

    @property
    def root_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def _retrying(self, call):
        return call_with_retries(call, self.retry_policy, watcher=self.retry_watcher)

    def put(self, key: str, data: bytes) -> str:
        object_key = self._object_key(key)
        self._retrying(lambda: self.client.put_object(Bucket=self.bucket, Key=object_key, Body=data))
        return self.uri(key)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        object_key = self._object_key(key)
        try:
            # The body is read inside the retried call: a connection cut mid-read is retried too.
            return self._retrying(lambda: self.client.get_object(Bucket=self.bucket, Key=object_key)["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(self.uri(key)) from None
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        object_key = self._object_key(key)
        try:
            self._retrying(lambda: self.client.head_object(Bucket=self.bucket, Key=object_key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise

    def list(self, prefix: str) -> list[str]:
        base = self._object_key(prefix).rstrip("/") + "/"
        skip = len(self.prefix) + 1 if self.prefix else 0

        def list_all() -> list[str]:  # a failure part way through lists again from the start
            keys = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                keys += [item["Key"][skip:] for item in page.get("Contents", [])]
            return keys

        return sorted(self._retrying(list_all))

    def delete(self, key: str) -> None:
        object_key = self._object_key(key)
        self._retrying(lambda: self.client.delete_object(Bucket=self.bucket, Key=object_key))

    def check_writable(self) -> None:
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            self.client.head_bucket(Bucket=self.bucket)
            self.put(probe, b"probe")
            self.delete(probe)
        except Exception as exc:  # every S3 failure here is one message about the destination
            raise explain_s3_error(exc, f"cannot write to {self.root_uri}") from None


def open_storage(uri: str) -> LocalStorage | S3Storage:
    if is_s3_uri(uri):
        return S3Storage(uri)
    if "://" in uri:
        raise OutputError(f"unsupported output address {uri!r}: use a local folder or s3://bucket/prefix")
    return LocalStorage(uri)


def read_destination(dest: str, read, action: str):
    """`read(storage)` on DEST, with any failure to reach it as one InputError saying what was tried."""
    from twig_batch.errors import InputError, TwigBatchError

    storage = open_storage(dest)
    try:
        return read(storage)
    except TwigBatchError:
        raise
    except OSError as exc:
        raise InputError(f"cannot {action} {storage.root_uri}: {exc}") from None
    except Exception as exc:  # S3: missing bucket, refused credentials, unreachable endpoint
        raise explain_s3_error(exc, f"cannot {action} {storage.root_uri}", error=InputError) from None
