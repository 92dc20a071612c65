"""Benchmark-only emulation of realistic text lengths: `TWIG_BATCH_EMULATE_TEXT_LENGTHS`.

Benchmarks run a Janus-Pro-7B-sized model with random weights, which never write end-of-sequence:
every thought, reflection and stage plan runs to its token limit (the worst case). With the variable
set, each text row instead stops, as if it had written end-of-sequence, after a number of tokens
drawn uniformly from its kind's range, capped by the call's token limit. The draw is a pure
function of the row's own noise seed and its kind, so an image gets the same lengths alone or in
any batch. A real model still stops earlier where it writes end-of-sequence first.

Value: comma-separated `kind=LOW-HIGH` (or `kind=N`) parts, kinds `thought` (twig's thought before
a band), `reflection` (twig's check after a band) and `plan` (seed's stage guidance); a kind left
out runs to its limit. `realistic` stands for the defaults below and may be followed by overrides,
e.g. `realistic,plan=50-150`. Empty or unset: no emulation.

The variable is read here only (`emulated_text_lengths`). The staged loops read it once per call and
hand the `TextLengths` to their thinker, scorer and guide, which put each row's length on its
prompt (`TextPrompt.stop_after`); every text writer honours that as a stop token. A batch driver
prints `describe()`, records `TextLengths.record()` and passes the variable on to its workers.

Where the defaults come from (assumptions, not measurements of Janus-Pro):
- thought 20-120: SPEC asks for one plain, literal sentence. One English sentence of 15-40 words is
  about 20-60 tokens of a Llama-style tokenizer; the range doubles the top for long-winded tails.
- reflection 25-130: a score line ("Score: 85", "Better:", ~8 tokens) plus one improved sentence
  of the same ~20-60 tokens, the top again doubled.
- plan 100-300: SPEC's guidance is up to 300 tokens, from an artist planning one stage of a
  painting: a paragraph, 100 tokens up to the limit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from twig_batch.seeds import derive_seed

ENV_VAR = "TWIG_BATCH_EMULATE_TEXT_LENGTHS"
KINDS = ("thought", "reflection", "plan")
DEFAULT_RANGES: dict[str, tuple[int, int]] = {"thought": (20, 120), "reflection": (25, 130), "plan": (100, 300)}


@dataclass(frozen=True)
class TextLengths:
    """The parsed spec: each emulated kind's inclusive token range (kinds not present run to the limit)."""

    ranges: dict[str, tuple[int, int]]
    spec: str  # the text it was parsed from

    def stop_after(self, kind: str, seed: int) -> int | None:
        """Tokens a row of `kind` with noise seed `seed` writes before stopping; None: no emulated stop."""
        if kind not in KINDS:
            raise ValueError(f"unknown text kind {kind!r} (expected one of {', '.join(KINDS)})")
        if kind not in self.ranges:
            return None
        low, high = self.ranges[kind]
        return low + derive_seed(seed, f"text-length/{kind}", 0) % (high - low + 1)

    def describe(self) -> str:
        parts = ", ".join(f"{kind} {self.ranges[kind][0]}-{self.ranges[kind][1]}" for kind in KINDS
                          if kind in self.ranges)
        return (f"text lengths emulated ({ENV_VAR}={self.spec}): {parts} tokens, uniform per row, "
                "capped by the token limits; benchmark-only assumption, not measured")

    def record(self) -> dict:
        """JSON-able form for run records."""
        return {"spec": self.spec, "ranges": {kind: list(self.ranges[kind]) for kind in KINDS if kind in self.ranges}}


def parse_text_lengths(spec: str) -> TextLengths | None:
    """The spec's `TextLengths`; None for an empty spec. Raises ValueError naming the bad part."""
    ranges: dict[str, tuple[int, int]] = {}
    given: set[str] = set()  # kinds named explicitly: each at most once
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "realistic":
            if ranges:
                raise ValueError(f"{ENV_VAR}: 'realistic' must come first, before any kind=LOW-HIGH (in {spec!r})")
            ranges.update(DEFAULT_RANGES)
            continue
        kind, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"{ENV_VAR}: {part!r} is neither kind=LOW-HIGH nor 'realistic' (in {spec!r})")
        if kind not in KINDS:
            raise ValueError(f"{ENV_VAR}: unknown kind {kind!r} in {part!r} (expected {', '.join(KINDS)})")
        if kind in given:
            raise ValueError(f"{ENV_VAR}: {kind!r} given twice (in {spec!r})")
        given.add(kind)
        ranges[kind] = _token_range(value, part)
    return TextLengths(ranges, spec.strip()) if ranges else None


def _token_range(value: str, part: str) -> tuple[int, int]:
    low_text, dash, high_text = value.partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if dash else low
    except ValueError:
        raise ValueError(f"{ENV_VAR}: {part!r}: the range must be LOW-HIGH or N in whole tokens") from None
    if low < 1 or high < low:
        raise ValueError(f"{ENV_VAR}: {part!r}: need 1 <= LOW <= HIGH, got {low}-{high}")
    return low, high


def emulated_text_lengths() -> TextLengths | None:
    """The emulation this process runs with (from the environment), or None when it is off."""
    return parse_text_lengths(os.environ.get(ENV_VAR, ""))


def describe() -> str:
    """One line for logs: the emulation in force, or that texts run as the model writes them."""
    lengths = emulated_text_lengths()
    if lengths is None:
        return (f"text lengths as the model writes them ({ENV_VAR} unset; random weights never stop, "
                "so their texts run to the token limits)")
    return lengths.describe()


def stops_for(lengths: TextLengths | None, kind: str, seeds: list[int]) -> list[int | None]:
    """Each row's emulated stop length (`TextPrompt.stop_after`); all None without emulation."""
    if lengths is None:
        return [None] * len(seeds)
    return [lengths.stop_after(kind, seed) for seed in seeds]
