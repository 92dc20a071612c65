"""One read of the input's used columns before the run: pages that cannot be decoded, repeated ids,
and prompts without ids that appear more than once.

A row without an id gets one made from its prompt (`work_items.content_id`), so identical prompts
without ids are one item and must be drawn once. The work items are made a slice at a time
(`work_feed`), and a slice cannot see that a prompt repeats in another; so the repeats are found
here, every copy of them is left out of the main stream, and one copy of each is drawn from a
small table of its own (`RepeatedPrompts.first_copies`), with the first copy's seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from twig_batch.distributed.work_items import content_id, decoded_texts, own_id, raw_ids, read_schema
from twig_batch.io.dataset import InputFiles, read_row_groups, refuse_repeated_ids


@dataclass(frozen=True, slots=True)
class RepeatedPrompts:
    ids: frozenset  # ids made from prompts that more than one id-less row holds
    copies: int  # rows that repeat an earlier row's prompt: drawn once with it
    first_copies: pa.Table | None  # the first row of each repeated prompt (the run's columns), or None

    def describe(self) -> str:
        return (f"{self.copies} row(s) repeat the prompt of an earlier row without an id: each such prompt is "
                f"one item, drawn once ({len(self.ids)} prompt(s))")


NO_REPEATS = RepeatedPrompts(frozenset(), 0, None)


def scan_input(files: InputFiles, prompt_column: str, id_column: str | None,
               seed_column: str | None) -> RepeatedPrompts:
    """Read every row group once (`read_row_groups` stops on a page it cannot decode), refuse repeated
    ids, and find the prompts without ids that repeat."""
    columns = [prompt_column] + [c for c in (id_column, seed_column) if c]
    id_pieces, sizes = [], [0] * len(files.paths)
    derived, where = [], []  # per row group: ids made from prompts (null where the row has its own id)
    for group in read_row_groups(files, columns):
        table = group.table
        sizes[group.file] += table.num_rows
        own = None
        if id_column:
            id_pieces.append(table.column(id_column))
            own, _ = raw_ids(table.column(id_column))
        prompts, _ = decoded_texts(table.column(prompt_column), "prompt")
        derived.append(pa.array([content_id(p) if own is None or own_id(own[i]) is None else None
                                 for i, p in enumerate(prompts)], pa.string()))
        where.append((group.file, group.index, table.num_rows))
    if id_column:
        refuse_repeated_ids(id_pieces, sizes, files.display, id_column)
    schema = read_schema(prompt_column, id_column, seed_column)
    return _repeats(files, schema, pa.chunked_array(derived, pa.string()), where)


def _repeats(files: InputFiles, schema: pa.Schema, derived: pa.ChunkedArray, where: list) -> RepeatedPrompts:
    present = derived.filter(pc.is_valid(derived))
    if pc.count_distinct(present).as_py() == len(present):
        return NO_REPEATS  # the common case, decided without building a table of counts
    counts = pa.table({"id": present}).group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts.column("id_count"), 1))
    ids = frozenset(repeated.column("id").to_pylist())
    copies = pc.sum(repeated.column("id_count")).as_py() - len(ids)
    # The first row of each repeated prompt, read again from its row group (only those groups).
    firsts: dict[str, int] = {}
    for position, value in enumerate(derived.to_pylist()):
        if value in ids and value not in firsts:
            firsts[value] = position
    wanted: dict[tuple[int, int], list[int]] = {}
    start = 0
    for file, index, rows in where:
        offsets = [p - start for p in firsts.values() if start <= p < start + rows]
        if offsets:
            wanted[(file, index)] = offsets
        start += rows
    tables = [group.table.select(schema.names).take(pa.array(sorted(wanted[(group.file, group.index)])))
              .cast(schema) for group in read_row_groups(files, schema.names, only=set(wanted))]
    return RepeatedPrompts(ids, copies, pa.concat_tables(tables))
