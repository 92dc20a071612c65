"""TriggerLog: one record per trigger evaluation of one image, in order, writable as Parquet."""
from __future__ import annotations

import math
import os
from pathlib import Path

# Column -> pyarrow type name. `attempt` counts drawings of the same band (a redrawn band is 1).
COLUMNS = {
    "band": "int32", "attempt": "int32", "step": "int32",
    "s_t": "float64", "delta_s": "float64", "var_s": "float64", "u_t": "float64",
    "fired": "bool_", "forced": "bool_", "injected": "bool_",
}


class TriggerLog:
    __slots__ = ("records",)

    def __init__(self) -> None:
        self.records: list[dict] = []

    def add(self, *, band: int, attempt: int, step: int, s_t: float, delta_s: float, var_s: float, u_t: float,
            fired: bool, forced: bool, injected: bool) -> None:
        if injected and not fired:
            raise ValueError("an injection needs a fired trigger")
        self.records.append({"band": band, "attempt": attempt, "step": step, "s_t": s_t, "delta_s": delta_s,
                             "var_s": var_s, "u_t": u_t, "fired": fired, "forced": forced, "injected": injected})

    def summary(self) -> dict:
        return summarize(self.records)


def summarize(records: list[dict]) -> dict:
    """Counts for an image's result record."""
    return {"evaluations": len(records), "fires": sum(1 for r in records if r["fired"]),
            "injections": sum(1 for r in records if r["injected"])}


def schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS.items()])


def write_trigger_log(records: list[dict], path: str | os.PathLike) -> Path:
    """Write records as Parquet with the fixed schema (an image with no evaluations gives 0 rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    columns = {name: [r[name] for r in records] for name in COLUMNS}
    table = pa.Table.from_pydict(columns, schema=schema())
    pq.write_table(table, str(path))
    return path


def read_trigger_log(path: str | os.PathLike) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(str(path)).to_pylist()


def same_records(a: list[dict], b: list[dict]) -> bool:
    """Equality that treats NaN (no previous evaluation) as equal to NaN."""
    def key(r):
        return tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in (r[c] for c in COLUMNS))
    return len(a) == len(b) and all(key(x) == key(y) for x, y in zip(a, b))
