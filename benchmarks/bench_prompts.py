"""Prompts for the end-to-end benchmarks: a Parquet file of N varied prompts of everyday length.

Usage: python benchmarks/bench_prompts.py OUT.parquet N
Each prompt is a subject, a setting and a style (8-20 words, like captions in training corpora),
with an id; the same N always gives the same file.
"""
from __future__ import annotations

import sys

SUBJECTS = ["a red fox", "an old lighthouse", "a bowl of ramen", "a vintage bicycle", "two children flying a kite",
            "a glass teapot", "a snow leopard", "a paper boat", "a robot gardener", "a stack of books"]
SETTINGS = ["on a misty hill at dawn", "in a busy night market", "beside a frozen lake", "on a sunlit kitchen table",
            "in a desert at noon", "under cherry blossoms", "inside a quiet library", "on a rainy city street"]
STYLES = ["oil painting", "studio photograph", "watercolor illustration", "35mm film still", "isometric 3D render",
          "charcoal sketch"]


def prompts(n: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]} {SETTINGS[(i // len(SUBJECTS)) % len(SETTINGS)]}, "
            f"{STYLES[(i // 7) % len(STYLES)]}, detailed, soft light" for i in range(n)]


def write(path: str, n: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"b{i:05d}" for i in range(n)], "prompt": prompts(n)}), path)
    return path


if __name__ == "__main__":
    write(sys.argv[1], int(sys.argv[2]))
