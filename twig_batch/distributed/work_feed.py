"""The run's work as the driver hands it out: input rows -> work items -> calls of one size.

The driver reads the input itself (pyarrow, one row group at a time, expanded a slice at a time), so
memory stays flat whatever the input's size, and nothing has to be planned or started before the
first call can go to an actor. The files were read whole once already (`input_scan`), so a page that
cannot be decoded never gets this far.

Calls are cut to one size (`per_call` work items), whatever the sizes of the files and row groups
behind them, so that every actor takes equal shares and none is left drawing a large last block
alone. Repeated prompts without ids are left out where they occur and drawn once, from their own
small table, at the end (`input_scan.RepeatedPrompts`).
"""
from __future__ import annotations

import itertools
from typing import Iterator

import pyarrow as pa

from twig_batch.distributed.input_scan import NO_REPEATS, RepeatedPrompts
from twig_batch.distributed.work_items import expand_to_work_items, read_schema
from twig_batch.io.dataset import InputFiles, read_row_groups

ROWS_PER_SLICE = 8192  # input rows expanded at once: with 4 samples, ~32k work items in memory


def work_calls(files: InputFiles, *, prompt_column: str, id_column: str | None, seed_column: str | None,
               samples: int, base_seed: int, skip: frozenset, per_call: int,
               repeats: RepeatedPrompts = NO_REPEATS) -> Iterator[pa.Table]:
    """Tables of `per_call` work items (the last may be smaller), in input order; nothing for an input
    whose every item is in `skip`."""
    expand = {"prompt_column": prompt_column, "id_column": id_column, "samples": samples, "base_seed": base_seed,
              "skip_keys": skip, "seed_column": seed_column}
    schema = read_schema(prompt_column, id_column, seed_column)
    items = (expand_to_work_items(rows, **expand, drawn_elsewhere=repeats.ids)
             for rows in _input_slices(files, schema))
    if repeats.first_copies is not None:  # each repeated prompt without an id, once
        items = itertools.chain(items, [expand_to_work_items(repeats.first_copies, **expand)])
    return _in_calls(items, per_call)


def _input_slices(files: InputFiles, schema: pa.Schema) -> Iterator[pa.Table]:
    """The run's columns, one type per column across files (`read_schema`), ROWS_PER_SLICE rows at a time."""
    for group in read_row_groups(files, schema.names):
        table = group.table.select(schema.names).cast(schema)
        for start in range(0, table.num_rows, ROWS_PER_SLICE):
            yield table.slice(start, ROWS_PER_SLICE)


def _in_calls(tables: Iterator[pa.Table], per_call: int) -> Iterator[pa.Table]:
    """The items of `tables` recut into tables of `per_call` rows."""
    held: list[pa.Table] = []
    count = 0
    for table in tables:
        if not table.num_rows:
            continue
        held.append(table)
        count += table.num_rows
        while count >= per_call:
            joined = pa.concat_tables(held)
            yield joined.slice(0, per_call).combine_chunks()
            rest = joined.slice(per_call)
            held, count = ([rest] if rest.num_rows else []), rest.num_rows
    if count:
        yield pa.concat_tables(held).combine_chunks()
