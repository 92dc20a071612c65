"""Input rows -> work items: one row per (id, sample) with its seed, minus what is already done.

This runs as a stateless `map_batches` step between `read_parquet` and the model actors. Ids are
cast to text; a row without one gets an id derived from its prompt, so identical prompts share an
id (and, with the same seed, would draw the same image: they are generated once).
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

from twig_batch.io.manifest import item_key
from twig_batch.seeds import derive_seed

WORK_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("sample_index", pa.int32()),
                         ("seed", pa.int64())])


def content_id(prompt: str | None) -> str:
    text = "" if prompt is None else prompt
    return "p-" + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _as_id(value) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def expand_to_work_items(batch: pa.Table, *, prompt_column: str, id_column: str | None, samples: int,
                         base_seed: int, skip_keys: frozenset | set = frozenset()) -> pa.Table:
    prompts = batch.column(prompt_column).to_pylist()
    raw_ids = batch.column(id_column).to_pylist() if id_column and id_column in batch.column_names else None
    rows: dict[str, list] = {name: [] for name in WORK_SCHEMA.names}
    for index, prompt in enumerate(prompts):
        prompt_id = _as_id(raw_ids[index]) if raw_ids is not None else None
        prompt_id = prompt_id or content_id(prompt)
        for sample in range(samples):
            if item_key(prompt_id, sample) in skip_keys:
                continue
            rows["id"].append(prompt_id)
            rows["prompt"].append(prompt)
            rows["sample_index"].append(sample)
            rows["seed"].append(derive_seed(base_seed, prompt_id, sample))
    return pa.Table.from_pydict(rows, schema=WORK_SCHEMA)
