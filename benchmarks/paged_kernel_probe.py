"""The paged-attention kernel alone, on the shapes the mixed loop's steps give it, against the copy rate.

Usage: python benchmarks/paged_kernel_probe.py --out DIR
One layer of a Janus-Pro-7B-sized page pool (32 heads of 128, bf16, pages of 16 handed out shuffled).
For each case (decoding rows at the lengths plain, seed and twig steps hold; prefill chunks of twig's
understanding prompts) the kernel runs under every launch of a small grid (`paged_attention.Launch`),
and the record gives each launch's time, the best, today's default, and the floor: the keys and values
the case reads at the copy rate (prefill chunks: also their FLOPs at the matmul rate). Where every row
has the same length, torch's scaled-dot-product attention over a dense copy of the same keys and values
is timed beside it (what the best contiguous kernel does; it reads no page table).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_common import COPY_BYTES_S, MATMUL_FLOP_S, cuda_ms
from twig_batch.engine.mixed.paged_attention import (DECODE_LAUNCH, PREFILL_LAUNCH, Launch, StepLayout,
                                                     gathered_attention, paged_attention)

HEADS, DIM, PAGE, DTYPE = 32, 128, 16, torch.bfloat16

# name: (new tokens, tokens held before) of each row
CASES = {
    "plain: 256 decoding rows at 350": [(1, 350)] * 256,
    "plain: 256 decoding rows at 620": [(1, 620)] * 256,
    "seed: 144 decoding rows at 700": [(1, 700)] * 144,
    "twig: 110 decoding rows, 40 at 1500 and 70 at 300": [(1, 1500)] * 40 + [(1, 300)] * 70,
    "twig: prefill, 2 chunks of 512 at 0 and 900": [(512, 0), (512, 900)],
    "twig: prefill, 8 chunks of 160 at 1300": [(160, 1300)] * 8,
}
DECODE_GRID = [Launch(16, n, w, s) for n, w, s in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4))]
PREFILL_GRID = [Launch(m, n, w, s) for m, n, w, s in itertools.product((64, 128), (32, 64), (4, 8), (1, 2, 3))]


def make_case(rows: list[tuple[int, int]], device) -> tuple:
    lengths = [h + n for n, h in rows]
    pages = [-(-n // PAGE) for n in lengths]
    order = list(range(sum(pages)))
    random.Random(0).shuffle(order)
    tables, first = [], 0
    for n in pages:
        tables.append(order[first:first + n])
        first += n
    slots = sum(pages) * PAGE
    keys = torch.randn(slots, HEADS, DIM, device=device, dtype=DTYPE)
    values = torch.randn(slots, HEADS, DIM, device=device, dtype=DTYPE)
    q = torch.randn(sum(n for n, _ in rows), HEADS, DIM, device=device, dtype=DTYPE)
    layout = StepLayout.build([n for n, _ in rows], [h for _, h in rows], tables, PAGE, device)
    return q, keys, values, layout


def time_us(fn) -> float:
    return 1000 * cuda_ms(fn)


def floor_us(rows: list[tuple[int, int]]) -> float:
    read = sum(h + n for n, h in rows) * HEADS * DIM * 2 * 2  # keys and values, 2 bytes each
    flops = sum(4 * n * (h + (n + 1) / 2) * HEADS * DIM for n, h in rows if n > 1)  # causal within a chunk
    return 1e6 * (read / COPY_BYTES_S + flops / MATMUL_FLOP_S)


def dense_us(rows: list[tuple[int, int]], device) -> float | None:
    if len({(n, h) for n, h in rows}) != 1 or rows[0][0] != 1:
        return None
    length = rows[0][1] + 1
    q = torch.randn(len(rows), HEADS, 1, DIM, device=device, dtype=DTYPE)
    k = torch.randn(len(rows), HEADS, length, DIM, device=device, dtype=DTYPE)
    v = torch.randn_like(k)
    return time_us(lambda: F.scaled_dot_product_attention(q, k, v))


def probe(name: str, rows: list[tuple[int, int]], device) -> dict:
    q, keys, values, layout = make_case(rows, device)
    decoding = all(n == 1 for n, _ in rows)
    grid, default = (DECODE_GRID, DECODE_LAUNCH) if decoding else (PREFILL_GRID, PREFILL_LAUNCH)
    want = gathered_attention(q, keys, values, layout)
    times = {}
    for launch in grid:
        run = (lambda l=launch: paged_attention(q, keys, values, layout, decode=l)) if decoding else \
            (lambda l=launch: paged_attention(q, keys, values, layout, prefill=l))
        try:
            got = run()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
            times[str(launch)] = time_us(run)
        except Exception as e:  # a launch the GPU cannot take (shared memory): recorded, not fatal
            times[str(launch)] = f"{type(e).__name__}: {str(e)[:120]}"
    timed = {k: v for k, v in times.items() if isinstance(v, float)}
    best = min(timed, key=timed.get)
    record = {"case": name, "floor_us": floor_us(rows), "dense_sdpa_us": dense_us(rows, device),
              "default": str(default), "default_us": timed.get(str(default)), "best": best,
              "best_us": timed[best], "launches_us": times}
    print(f"{name}: floor {record['floor_us']:.0f} us, default {record['default_us'] or float('nan'):.0f} us, "
          f"best {timed[best]:.0f} us ({best}), dense sdpa {record['dense_sdpa_us']}", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    records = [probe(name, rows, device) for name, rows in CASES.items()]
    (args.out / "paged_kernel_probe.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "cases": records}, indent=1))


if __name__ == "__main__":
    main()
