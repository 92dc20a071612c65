"""`twig-batch verify` with the input: io.verify's checks of DEST, and the input expanded the way the
batch job expands it (its work items), which the io layer does not know.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from twig_batch.distributed.work_items import expand_to_work_items
from twig_batch.io.dataset import check_input, resolve_input
from twig_batch.io.manifest import item_key
from twig_batch.io.verify import VerifyReport, verify_output


def verify_run(dest: str, input: str | None = None) -> VerifyReport:
    """Check DEST (a local folder or s3://bucket/prefix) and, with `input`, its (id, sample) against the input's."""
    return verify_output(dest, input, expected_keys if input is not None else None)


def expected_keys(input: str, info: dict) -> set[str]:
    """Every (id, sample) the run makes of `input`, as `item_key` strings, expanded the way the run does."""
    prompt_column, id_column = info["prompt_column"], info.get("id_column")
    files = resolve_input(input)
    check_input(files, prompt_column, id_column or "id", id_column_required=id_column is not None)
    columns = [prompt_column] + ([id_column] if id_column else [])
    keys: set[str] = set()
    for path in files.paths:
        with files.filesystem.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=8192, columns=columns):
                items = expand_to_work_items(pa.Table.from_batches([batch]), prompt_column=prompt_column,
                                             id_column=id_column, samples=int(info["samples_per_prompt"]),
                                             base_seed=int(info.get("base_seed") or 0))
                keys.update(item_key(i, s) for i, s in zip(items.column("id").to_pylist(),
                                                            items.column("sample_index").to_pylist()))
    return keys
