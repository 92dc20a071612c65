"""Regenerates examples/prompts.parquet, the sample prompts of the quick start.

    python examples/make_prompts.py [OUTPUT]

Two columns, the batch job's defaults: `id` (text) and `prompt` (text).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    ("red-cube", "a glossy red cube resting on a wooden table, soft window light"),
    ("lighthouse", "a white lighthouse on a rocky cliff at dusk, waves below"),
    ("fox-snow", "a red fox walking through fresh snow in a birch forest"),
    ("teapot", "a blue ceramic teapot beside two cups on a linen cloth"),
    ("city-rain", "a narrow city street at night in the rain, neon reflections on the pavement"),
    ("hot-air-balloons", "three hot-air balloons drifting over green hills in the morning"),
    ("library", "an old library with tall shelves and a ladder, warm lamplight"),
    ("koi-pond", "orange koi fish in a clear pond with lily pads, seen from above"),
    ("mountain-lake", "a still mountain lake reflecting snowy peaks under a clear sky"),
    ("bicycle", "a yellow bicycle leaning against a brick wall covered in ivy"),
    ("desert-camel", "a camel caravan crossing sand dunes under a large orange sun"),
    ("sailboat", "a small sailboat on a calm sea with a striped sail"),
    ("greenhouse", "the inside of a glass greenhouse full of ferns and hanging plants"),
    ("robot-painter", "a friendly robot painting a sunflower on an easel"),
    ("bakery", "fresh loaves of bread on the shelves of a village bakery"),
    ("owl-moon", "an owl perched on a branch in front of a full moon"),
]


def main(output: str | None = None) -> Path:
    path = Path(output) if output else Path(__file__).with_name("prompts.parquet")
    table = pa.table({"id": [i for i, _ in PROMPTS], "prompt": [p for _, p in PROMPTS]})
    pq.write_table(table, path)
    return path


if __name__ == "__main__":
    print(f"wrote {main(*sys.argv[1:2])}")
