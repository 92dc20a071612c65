"""The policy of a text call: which prompt runs in which cache row, and when. Plain data only.

As in nano-vllm, a scheduler decides and a runner (`fast_text.py`) executes. The scheduler knows
each prompt's length and budget and which rows have drawn the stop token (as the runner last read
them off the device); it never touches a tensor. It decides:
- which prompts a round prefills (the first `max_rows` still waiting, in order) and how wide the
  round's cache is;
- at which steps the host asks the device which rows are done: every `CHECK_EVERY` steps, since each
  check waits for the device (a finished row idles up to CHECK_EVERY - 1 steps before it is reused);
- which finished rows the next waiting prompts take, in order, while a joiner's budget still fits
  in the cache (when it no longer does, the rows drain and a new round starts);
- when dropping finished rows from the cache pays (`COMPACT_MIN_STEPS`), and when a round is over.
"""
from __future__ import annotations

from dataclasses import dataclass

CHECK_EVERY = 16  # steps between checks whether rows have finished
COMPACT_MIN_STEPS = 32  # steps that must remain for dropping finished rows to pay


@dataclass(frozen=True)
class RoundPlan:
    """What a round prefills: `prompts` (in waiting order), left-padded to `width` columns, in a
    cache `columns` wide."""
    prompts: list[int]
    width: int
    columns: int


@dataclass
class _Row:
    prompt: int
    start: int  # the call's step at which the row drew its first token (its token index is step - start)
    last: int  # the step at which it draws the last token its budget allows
    stopped: bool = False  # drew the stop token (as of the last check)

    def finished(self, step: int) -> bool:
        return self.stopped or step >= self.last


class TextScheduler:
    """One text call's decisions over prompts of `lengths` tokens that may write `budgets` tokens each
    (at most `max_new_tokens`), at most `max_rows` at a time. Joiners are prefilled a group at a time,
    of at most `prefill_tokens` prompt tokens (one prompt at least)."""

    def __init__(self, lengths: list[int], budgets: list[int], max_new_tokens: int, max_rows: int,
                 prefill_tokens: int, check_every: int | None = None, compact_min_steps: int | None = None):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.lengths, self.budgets, self.max_new_tokens, self.max_rows = lengths, budgets, max_new_tokens, max_rows
        self.prefill_tokens = prefill_tokens
        self.check_every = CHECK_EVERY if check_every is None else check_every
        self.compact_min_steps = COMPACT_MIN_STEPS if compact_min_steps is None else compact_min_steps
        self.waiting = list(range(len(lengths)))  # prompts not started yet, in the order they take rows
        self.rows: list[_Row] = []
        self.columns = 0

    # --- rounds -----------------------------------------------------------------------------------

    def next_round(self) -> RoundPlan | None:
        """The next round's prefill, or None when every prompt has started."""
        if not self.waiting:
            return None
        first, self.waiting = self.waiting[:self.max_rows], self.waiting[self.max_rows:]
        # A joiner's prompt goes into the columns just before the current one, so the prefill is as
        # wide as every waiting prompt and the cache has room for a second budget of tokens. A round
        # that ran on would slow every row (each step attends to all columns written so far).
        width = max(self.lengths[i] for i in first + self.waiting)
        self.columns = width + self.max_new_tokens * (2 if self.waiting else 1)
        return RoundPlan(first, width, self.columns)

    def started(self, prompts: list[int], step: int = 0) -> None:
        """The round's rows hold `prompts` (in cache row order) from `step` on."""
        self.rows = [self._row(prompt, step) for prompt in prompts]

    def _row(self, prompt: int, step: int, stopped: bool = False) -> _Row:
        return _Row(prompt, step, step + self.budgets[prompt] - 1, stopped)

    def prompts_by_row(self) -> list[int]:
        return [row.prompt for row in self.rows]

    def cohorts(self) -> list[tuple[int, list[int]]]:
        """Rows grouped by the step they started at, first start first: (start, rows)."""
        by_start: dict[int, list[int]] = {}
        for index, row in enumerate(self.rows):
            by_start.setdefault(row.start, []).append(index)
        return list(by_start.items())

    # --- steps and checks -------------------------------------------------------------------------

    def last_step(self) -> int:
        """The step at which the round's latest row has drawn a whole `max_new_tokens`."""
        return max(row.start for row in self.rows) + self.max_new_tokens - 1

    def checks_at(self, step: int) -> bool:
        return step == self.last_step() or step % self.check_every == self.check_every - 1

    def note_stopped(self, stopped: list[bool]) -> None:
        """Which rows have drawn the stop token, as read off the device at a check."""
        for row, flag in zip(self.rows, stopped):
            row.stopped = flag

    def finished(self, step: int) -> list[int]:
        """The rows done by `step`: stop token drawn, or budget written."""
        return [index for index, row in enumerate(self.rows) if row.finished(step)]

    def room_for_joiners(self, used: int) -> bool:
        # A joiner's first token is written at column `used`, its last before `used + max_new_tokens`.
        return used + self.max_new_tokens <= self.columns

    def joiners(self, step: int, used: int) -> tuple[list[int], list[int]]:
        """(rows, prompts): finished rows and the waiting prompts that take them now, in order; empty
        when nobody waits, no row is free or a joiner's budget would not fit after column `used`.
        The runner reports back with `joined`."""
        if not self.waiting or not self.room_for_joiners(used):
            return [], []
        group = max(1, self.prefill_tokens // max(self.lengths[i] for i in self.waiting))
        rows = self.finished(step)[:min(len(self.waiting), group)]
        prompts, self.waiting = self.waiting[:len(rows)], self.waiting[len(rows):]
        return rows, prompts

    def joined(self, rows: list[int], prompts: list[int], step: int, stopped: list[bool]) -> None:
        """`prompts` drew their first token at `step` in `rows`; `stopped`: which of them drew the stop token."""
        for index, prompt, flag in zip(rows, prompts, stopped):
            self.rows[index] = self._row(prompt, step, flag)

    def round_over(self, step: int) -> bool:
        return len(self.finished(step)) == len(self.rows)

    def rows_to_keep(self, step: int, used: int) -> list[int] | None:
        """The rows to keep when dropping the finished ones pays now, else None. Finished rows keep
        computing until dropped; dropping costs a copy of the live rows' cache (and, on a GPU, fresh
        graph captures), so it waits until at least half the rows are idle with enough steps left to
        earn it back, and never while prompts wait to join (they need the rows, not a smaller cache).
        The runner reports back with `kept`."""
        if self.waiting and self.room_for_joiners(used):
            return None
        finished = set(self.finished(step))
        steps_left = self.last_step() - step
        if len(finished) * 2 < len(self.rows) or steps_left < self.compact_min_steps:
            return None
        return [index for index in range(len(self.rows)) if index not in finished]

    def kept(self, rows: list[int]) -> None:
        self.rows = [self.rows[index] for index in rows]
