"""Input rows -> work items: one row per (id, sample) with its seed, minus what is already done.

The driver runs this on each slice of the input it reads (`work_feed`). Ids are
cast to text; a row without one gets an id derived from its prompt, so identical prompts share an
id (and, with the same seed, would draw the same image: they are generated once).

Seeds: without a seed column, each (id, sample) gets `derive_seed(base_seed, id, sample)`. With
one, sample 0 draws with the row's seed itself and sample i >= 1 with `derive_seed(row_seed, "", i)`,
so a row seed means the same images whatever the row's id or the run's base seed. A row seed must
be an integer in 0 .. 2**63 - 1; a null, negative or larger one turns that row's items into error
items (their `problem` says why), which the model actors pass on as error rows without drawing.

A work item carries its final id and seed: the model actors draw with them as they are. Rows that
come from a pipeline of the user's own (`ImageGenerator` in any Ray Data job) may leave them out;
`as_work_item` completes those by the same rules, once.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

from twig_batch.io.manifest import item_key
from twig_batch.seeds import derive_seed

WORK_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("sample_index", pa.int32()),
                         ("seed", pa.int64()), ("problem", pa.string())])
MAX_SEED = 2**63 - 1  # seeds travel as int64


def content_id(prompt: str | None) -> str:
    text = "" if prompt is None else prompt
    return "p-" + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def own_id(value) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def seed_problem(value, seed_column: str) -> str | None:
    """Why a row's seed cannot be used, or None."""
    if value is None:
        return f"seed is missing (null in column {seed_column!r})"
    if value < 0:
        return f"seed {value} in column {seed_column!r} is negative; seeds lie in 0 .. 2**63 - 1"
    if value > MAX_SEED:
        return f"seed {value} in column {seed_column!r} does not fit in int64; seeds lie in 0 .. 2**63 - 1"
    return None


def sample_seed(row_seed: int, sample: int) -> int:
    """The seed of sample `sample` of a row whose seed column holds `row_seed`."""
    return row_seed if sample == 0 else derive_seed(row_seed, "", sample)


def as_work_item(row: dict, base_seed: int | None) -> dict:
    """`row` with its id, sample index and seed. A work item of `expand_to_work_items` has them all
    (an error item has no seed) and passes as it is. Another pipeline's row without an id gets its
    prompt's content id, without a sample index 0, without a seed `derive_seed(base_seed, id, sample)`."""
    prompt = row.get("prompt")
    prompt_id = row.get("id")
    prompt_id = str(prompt_id) if prompt_id is not None else content_id(prompt if isinstance(prompt, str) else None)
    sample = int(row.get("sample_index") or 0)
    seed = row.get("seed")
    if seed is not None:
        seed = int(seed)
    elif not row.get("problem"):
        if base_seed is None:
            raise ValueError(f"work item (id={prompt_id!r}, sample={sample}) has no seed, and no base seed was given "
                             "to derive one")
        seed = derive_seed(base_seed, prompt_id, sample)
    return {**row, "id": prompt_id, "sample_index": sample, "seed": seed}


def decoded_texts(column: pa.ChunkedArray, what: str) -> tuple[list, list[str | None]]:
    """A text column as Python strings, and per value why it is unusable (None when fine).

    Parquet writers that skip validation can store bytes that are not UTF-8; such a value would
    stop the whole batch, so it is shown with replacement characters and becomes its row's problem.
    """
    try:
        return column.to_pylist(), [None] * len(column)
    except UnicodeDecodeError:
        pass
    texts, problems = [], []
    for raw in column.cast(pa.binary()).to_pylist():
        try:
            texts.append(None if raw is None else raw.decode("utf-8"))
            problems.append(None)
        except UnicodeDecodeError as exc:
            texts.append(raw.decode("utf-8", "replace"))
            problems.append(f"{what} is not valid UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start})")
    return texts, problems


def read_schema(prompt_column: str, id_column: str | None, seed_column: str | None) -> pa.Schema:
    """The input columns a run reads, one type per column across files.

    Otherwise files whose ids are integers in one and text in another could not be read as one, nor
    an unsigned seed beyond int64. Ids become text anyway; decimal(20, 0) holds every int64 and
    uint64 seed, and the work items check each seed's range.
    """
    return pa.schema([(prompt_column, pa.string())] + ([(id_column, pa.string())] if id_column else [])
                     + ([(seed_column, pa.decimal128(20, 0))] if seed_column else []))


def raw_ids(column: pa.ChunkedArray) -> tuple[list, list[str | None]]:
    """An id column's values (text or integers), and per value why it is unusable (None when fine)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return decoded_texts(column, "id")
    return column.to_pylist(), [None] * len(column)


def expand_to_work_items(batch: pa.Table, *, prompt_column: str, id_column: str | None, samples: int,
                         base_seed: int, skip_keys: frozenset | set = frozenset(),
                         seed_column: str | None = None, drawn_elsewhere: frozenset = frozenset()) -> pa.Table:
    """`drawn_elsewhere`: ids made from prompts whose rows are left out here (repeated prompts without
    ids, drawn once from a table of their own: `input_scan.RepeatedPrompts`)."""
    prompts, text_problems = decoded_texts(batch.column(prompt_column), "prompt")
    ids = None
    if id_column and id_column in batch.column_names:
        ids, id_problems = raw_ids(batch.column(id_column))
        text_problems = [a or b for a, b in zip(id_problems, text_problems)]
    row_seeds = None
    if seed_column:  # integers of any width, or decimals when read with one type for every file
        row_seeds = [None if value is None else int(value) for value in batch.column(seed_column).to_pylist()]
    rows: dict[str, list] = {name: [] for name in WORK_SCHEMA.names}
    for index, prompt in enumerate(prompts):
        prompt_id = own_id(ids[index]) if ids is not None else None
        if prompt_id is None and drawn_elsewhere and content_id(prompt) in drawn_elsewhere:
            continue
        prompt_id = prompt_id or content_id(prompt)
        problem = text_problems[index]
        if problem is None and row_seeds is not None:
            problem = seed_problem(row_seeds[index], seed_column)
        for sample in range(samples):
            if item_key(prompt_id, sample) in skip_keys:
                continue
            if problem:
                seed = None
            elif row_seeds is not None:
                seed = sample_seed(row_seeds[index], sample)
            else:
                seed = derive_seed(base_seed, prompt_id, sample)
            rows["id"].append(prompt_id)
            rows["prompt"].append(prompt)
            rows["sample_index"].append(sample)
            rows["seed"].append(seed)
            rows["problem"].append(problem)
    return pa.Table.from_pydict(rows, schema=WORK_SCHEMA)
