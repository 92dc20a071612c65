"""Error rows at the end of a run: how many a run may hold and still count as a success, and their
most common causes.

A run that finishes with error rows has gaps in its corpus. A pipeline that checks exit codes must
see that, so `twig-batch run` and `twig-batch verify` exit with `ROW_ERRORS_EXIT_CODE` when the
manifest holds more error rows than the user allowed (none, unless `--max-errors` or
`--allow-errors` say otherwise).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from twig_batch.errors import InputError

ROW_ERRORS_EXIT_CODE = 3  # 0: every row ok (or the errors allowed); 1: verify found problems; 2: the run failed
SHOWN_CAUSES = 3


@dataclass(frozen=True, slots=True)
class ErrorAllowance:
    """The most error rows a finished run may hold: a count, a fraction of its rows, or any number."""

    count: int | None = 0
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str | None, allow_all: bool = False) -> "ErrorAllowance":
        """`--max-errors` ("25" or "1%") and `--allow-errors` -> an allowance; none given allows no error row."""
        if allow_all:
            if text is not None:
                raise InputError("--allow-errors allows any number of error rows and --max-errors a limit: pass one")
            return cls(count=None)
        if text is None:
            return cls()
        value = text.strip()
        try:
            if value.endswith("%"):
                percent = float(value[:-1])
                if 0 <= percent <= 100:
                    return cls(count=None, fraction=percent / 100)
            elif int(value) >= 0:
                return cls(count=int(value))
        except ValueError:
            pass
        raise InputError(f"--max-errors takes a number of rows (25) or a percentage of them (1%), got {text!r}")

    def allows(self, errors: int, rows: int) -> bool:
        if self.fraction is not None:
            return errors <= self.fraction * rows
        return self.count is None or errors <= self.count

    def describe(self) -> str:
        """The option that set it, as a person would type it."""
        if self.fraction is not None:
            return f"--max-errors {100 * self.fraction:g}%"
        if self.count is None:
            return "--allow-errors"
        return f"--max-errors {self.count}" if self.count else "none"


def common_causes(messages: Iterable[str | None], top: int = SHOWN_CAUSES) -> list[tuple[str, int]]:
    """The most frequent reasons, as (an example message, rows), most frequent first.

    Messages that differ only in their numbers (a token count, a position) are one cause.
    """
    counts: Counter = Counter()
    examples: dict[str, str] = {}
    for message in messages:
        message = message or "no reason recorded"
        pattern = re.sub(r"\d+", "#", message)
        counts[pattern] += 1
        examples.setdefault(pattern, message)
    return [(examples[pattern], count) for pattern, count in counts.most_common(top)]


def describe_causes(causes: list[tuple[str, int]], errors: int) -> str:
    shown = "; ".join(f"{count} x {message}" for message, count in causes)
    rest = errors - sum(count for _, count in causes)
    return shown + (f"; {rest} more of other causes" if rest > 0 else "")
