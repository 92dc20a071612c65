"""Prompts for the end-to-end benchmarks: a Parquet file of N varied prompts of everyday length.

Usage: python benchmarks/bench_prompts.py OUT.parquet N
Each prompt is a subject, a setting and a style (8-20 words, like captions in training corpora),
with an id; the same N always gives the same file.
"""
from __future__ import annotations

import sys

from bench_common import write

if __name__ == "__main__":
    write(sys.argv[1], int(sys.argv[2]))
