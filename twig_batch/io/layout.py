"""The output layout: every object's key under DEST, decided by (id, sample) alone.

Ids are user data and may hold anything (`../../etc/passwd`, `a/b`, emoji, 300 characters), so an
id never becomes a path component as is. Each id maps to one folder name made of a readable,
sanitised slug plus a hash of the exact id: the hash makes the name unique, the slug lets a person
find a prompt by eye. A two-character fan-out folder keeps directory listings and S3 prefixes small.

    DEST/
      run.json                                  settings, versions, input fingerprint
      manifest.parquet                          one row per (id, sample); written at the end of a run
      manifest-journal/<attempt>-<n>.parquet    rows flushed while a run is in flight
      images/<h2>/<slug>-<hash>/sample-0000.png                     final image
      images/<h2>/<slug>-<hash>/sample-0000.stage-00-<label>.png    partial image at a band boundary
      images/<h2>/<slug>-<hash>/sample-0000.triggers.parquet        controller trigger log
      _COMPLETE.json                            written last: the run finished, the manifest is final
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

RUN_INFO = "run.json"
MANIFEST = "manifest.parquet"
JOURNAL_DIR = "manifest-journal"
COMPLETE_MARKER = "_COMPLETE.json"
IMAGES_DIR = "images"
PROBE_PREFIX = ".twig-batch-write-probe-"
RESERVE_FILE = ".twig-batch-reserve"  # local output only: space kept for the records of a run that fills its disk

_SLUG_LENGTH = 40
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def id_hash(prompt_id: str) -> str:
    return hashlib.blake2b(prompt_id.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def id_slug(prompt_id: str) -> str:
    """A readable ASCII fragment of the id; never empty, never `.`/`..`, never hidden."""
    ascii_text = unicodedata.normalize("NFKD", prompt_id).encode("ascii", "ignore").decode()
    slug = _UNSAFE.sub("_", ascii_text)[:_SLUG_LENGTH].strip("._-")
    return slug or "id"


def item_folder(prompt_id: str) -> str:
    digest = id_hash(prompt_id)
    return f"{IMAGES_DIR}/{digest[:2]}/{id_slug(prompt_id)}-{digest}"


def sample_name(sample_index: int) -> str:
    """`sample-0003`: the stem of a sample's files, in a run's item folder and in `twig-batch generate`'s."""
    if sample_index < 0:
        raise ValueError(f"sample index must be >= 0, got {sample_index}")
    return f"sample-{sample_index:04d}"


def stage_suffix(position: int, label: str) -> str:
    # Labels come from the generation modes; they are sanitised too so that no mode can escape.
    return f".stage-{position:02d}-{id_slug(str(label))}.png"


TRIGGER_LOG_SUFFIX = ".triggers.parquet"


def sample_stem(prompt_id: str, sample_index: int) -> str:
    return f"{item_folder(prompt_id)}/{sample_name(sample_index)}"


def image_key(prompt_id: str, sample_index: int) -> str:
    return f"{sample_stem(prompt_id, sample_index)}.png"


def stage_image_key(prompt_id: str, sample_index: int, position: int, label: str) -> str:
    return sample_stem(prompt_id, sample_index) + stage_suffix(position, label)


def trigger_log_key(prompt_id: str, sample_index: int) -> str:
    return sample_stem(prompt_id, sample_index) + TRIGGER_LOG_SUFFIX


def journal_key(attempt: str, sequence: int) -> str:
    return f"{JOURNAL_DIR}/{attempt}-{sequence:06d}.parquet"
