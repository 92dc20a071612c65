"""The text call's policy on plain data: which prompt takes which row and when, when a check comes,
when compacting pays, when a round ends. No model and no tensors: the runner's side is simulated."""
import random

import pytest

from twig_batch.engine.text_scheduler import TextScheduler


def _scheduler(lengths, max_rows, max_new=8, budgets=None, **kwargs):
    budgets = [max_new] * len(lengths) if budgets is None else budgets
    kwargs = {"prefill_tokens": 10**6, "check_every": 4, "compact_min_steps": 8, **kwargs}
    return TextScheduler(lengths, budgets, max_new, max_rows, **kwargs)


def _run(scheduler, stop_at, limit=10_000):
    """Drive `scheduler` as the runner does: prompt p draws the stop token as its token `stop_at[p]`
    (None: never). Returns, per prompt, (round, step it started at, tokens it drew), and the rows
    kept at each compaction."""
    drawn, started, compactions, rounds = {}, {}, [], 0
    while (plan := scheduler.next_round()) is not None:
        scheduler.started(plan.prompts)
        starts = {prompt: 0 for prompt in plan.prompts}
        started.update({prompt: (rounds, 0) for prompt in plan.prompts})
        used, step = plan.width, 0
        while True:
            assert step < limit, "the round never ends"
            for prompt in scheduler.prompts_by_row():
                drawn[prompt] = step - starts[prompt] + 1

            def stopped(prompt):
                return stop_at[prompt] is not None and step - starts[prompt] >= stop_at[prompt]

            if scheduler.checks_at(step):
                scheduler.note_stopped([stopped(p) for p in scheduler.prompts_by_row()])
                while True:
                    rows, prompts = scheduler.joiners(step, used)
                    if not rows:
                        break
                    assert used + scheduler.max_new_tokens <= plan.columns  # the joiner's budget fits
                    starts.update({prompt: step for prompt in prompts})
                    started.update({prompt: (rounds, step) for prompt in prompts})
                    drawn.update({prompt: 1 for prompt in prompts})
                    scheduler.joined(rows, prompts, step, [stopped(p) for p in prompts])
                if scheduler.round_over(step):
                    break
                keep = scheduler.rows_to_keep(step, used)
                if keep is not None:
                    compactions.append(keep)
                    scheduler.kept(keep)
            used, step = used + 1, step + 1
        rounds += 1
    return {p: (*started[p], drawn[p]) for p in started}, compactions


def _needed(stop_at, budgets):
    """Tokens each prompt must draw: through its stop token, or its whole budget."""
    return [budget if stop is None else min(stop + 1, budget) for stop, budget in zip(stop_at, budgets)]


def test_a_finished_row_goes_to_the_next_waiting_prompt_in_order():
    scheduler = _scheduler([3, 5, 4, 2, 6], max_rows=2)
    plan = scheduler.next_round()
    assert plan.prompts == [0, 1]
    scheduler.started(plan.prompts)
    used = plan.width
    assert scheduler.checks_at(3) and not scheduler.checks_at(2)
    scheduler.note_stopped([False, True])  # row 1 drew the stop token
    assert scheduler.joiners(3, used + 3) == ([1], [2])
    scheduler.joined([1], [2], 3, [False])
    assert scheduler.joiners(3, used + 3) == ([], [])  # nothing else is free: prompt 3 waits
    scheduler.note_stopped([True, False])
    assert scheduler.joiners(7, used + 7) == ([0], [3])
    scheduler.joined([0], [3], 7, [False])
    assert scheduler.prompts_by_row() == [3, 2] and scheduler.waiting == [4]


def test_rows_freed_together_go_to_waiting_prompts_in_row_and_waiting_order():
    scheduler = _scheduler([4] * 7, max_rows=4)
    scheduler.started(scheduler.next_round().prompts)
    scheduler.note_stopped([True, False, True, True])
    assert scheduler.joiners(3, 10) == ([0, 2, 3], [4, 5, 6])


def test_a_joiner_that_draws_the_stop_token_at_once_frees_its_row_again():
    scheduler = _scheduler([4] * 4, max_rows=2)
    scheduler.started(scheduler.next_round().prompts)
    scheduler.note_stopped([True, False])
    assert scheduler.joiners(3, 10) == ([0], [2])
    scheduler.joined([0], [2], 3, [True])
    assert scheduler.joiners(3, 10) == ([0], [3])


def test_joiners_move_in_groups_no_larger_than_one_prefill():
    scheduler = _scheduler([10] * 6, max_rows=3, prefill_tokens=25)  # two 10-token prompts per prefill
    scheduler.started(scheduler.next_round().prompts)
    scheduler.note_stopped([True, True, True])
    assert scheduler.joiners(3, 12) == ([0, 1], [3, 4])
    scheduler.joined([0, 1], [3, 4], 3, [False, False])
    assert scheduler.joiners(3, 12) == ([2], [5])
    one_at_a_time = _scheduler([10] * 3, max_rows=2, prefill_tokens=1)  # a prompt wider than a prefill still joins
    one_at_a_time.started(one_at_a_time.next_round().prompts)
    one_at_a_time.note_stopped([True, True])
    assert one_at_a_time.joiners(3, 12) == ([0], [2])


def test_a_round_is_as_wide_as_every_waiting_prompt_with_room_for_joiners_only_when_some_wait():
    scheduler = _scheduler([3, 4, 9, 5], max_rows=2, max_new=8)
    first = scheduler.next_round()
    assert (first.prompts, first.width, first.columns) == ([0, 1], 9, 9 + 2 * 8)
    everyone = _scheduler([3, 4, 9, 5], max_rows=4, max_new=8).next_round()
    assert (everyone.prompts, everyone.width, everyone.columns) == ([0, 1, 2, 3], 9, 9 + 8)


def test_no_joiner_once_its_budget_no_longer_fits_and_the_rest_start_a_new_round():
    scheduler = _scheduler([4] * 3, max_rows=2, max_new=8)
    plan = scheduler.next_round()  # 4 + 16 columns
    scheduler.started(plan.prompts)
    scheduler.note_stopped([True, True])
    assert scheduler.joiners(7, plan.columns - 7) == ([], [])  # 13 + 8 > 20
    assert scheduler.round_over(7)
    assert scheduler.next_round().prompts == [2]


def test_a_row_finishes_at_its_stop_token_or_its_own_budget():
    scheduler = _scheduler([4] * 3, max_rows=3, max_new=20, budgets=[20, 3, 20])
    scheduler.started([0, 1, 2])
    assert scheduler.finished(1) == []
    assert scheduler.finished(2) == [1]  # its third token: its budget (a prompt's `stop_after`)
    scheduler.note_stopped([False, False, True])
    assert scheduler.finished(2) == [1, 2] and not scheduler.round_over(18)
    assert scheduler.round_over(19)  # the whole budget written


def test_checks_come_every_few_steps_and_at_the_rounds_last_step():
    scheduler = _scheduler([4] * 2, max_rows=2, max_new=10, check_every=4)
    scheduler.started([0, 1])
    assert [step for step in range(12) if scheduler.checks_at(step)] == [3, 7, 9, 11]
    scheduler.note_stopped([True, False])
    scheduler.joined([0], [0], 7, [False])  # a row starting at step 7 moves the last step to 16
    assert [step for step in range(20) if scheduler.checks_at(step)] == [3, 7, 11, 15, 16, 19]


@pytest.mark.parametrize("finished, steps_left, compacts", [
    (2, 8, True),  # half the rows idle, enough steps left to earn the copy back
    (3, 20, True),
    (1, 20, False),  # fewer than half idle
    (2, 7, False),  # too few steps left
])
def test_finished_rows_are_dropped_only_when_enough_of_them_idle_long_enough(finished, steps_left, compacts):
    scheduler = _scheduler([4] * 4, max_rows=4, max_new=24, compact_min_steps=8)
    scheduler.started([0, 1, 2, 3])
    scheduler.note_stopped([row < finished for row in range(4)])
    step = 23 - steps_left
    assert scheduler.rows_to_keep(step, 10) == (list(range(finished, 4)) if compacts else None)


def test_no_compaction_while_prompts_wait_for_rows_they_can_still_take():
    scheduler = _scheduler([4] * 5, max_rows=4, max_new=24, compact_min_steps=8)
    plan = scheduler.next_round()
    scheduler.started(plan.prompts)
    scheduler.note_stopped([True, True, True, False])
    assert scheduler.rows_to_keep(3, plan.columns - 30) is None  # prompt 4 will join
    assert scheduler.rows_to_keep(3, plan.columns - 10) == [3]  # its budget no longer fits


def test_compaction_keeps_each_rows_prompt_and_start():
    scheduler = _scheduler([4] * 4, max_rows=4, max_new=40)
    scheduler.started([0, 1, 2, 3])
    scheduler.note_stopped([True, False, True, False])
    scheduler.kept(scheduler.rows_to_keep(3, 10))
    assert scheduler.prompts_by_row() == [1, 3] and scheduler.cohorts() == [(0, [0, 1])]


def test_max_rows_below_one_is_refused():
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        _scheduler([4], max_rows=0)


@pytest.mark.parametrize("max_rows", [1, 2, 3, 5, 12])
@pytest.mark.parametrize("seed", range(4))
def test_every_prompt_runs_to_its_end_and_none_is_starved(max_rows, seed):
    rng = random.Random(seed)
    n, max_new = 12, 20
    lengths = [rng.randint(2, 30) for _ in range(n)]
    stop_at = [rng.choice([None, rng.randint(0, 25)]) for _ in range(n)]
    budgets = [rng.choice([max_new, rng.randint(1, max_new)]) for _ in range(n)]
    scheduler = _scheduler(lengths, max_rows, max_new, budgets, prefill_tokens=60)
    runs, _ = _run(scheduler, stop_at)
    assert sorted(runs) == list(range(n))  # every prompt started, once
    starts = [runs[p][:2] for p in range(n)]
    assert starts == sorted(starts)  # in the order they waited
    # No row is handed on (or dropped) before its prompt drew its stop token or its budget.
    assert [runs[p][2] >= need for p, need in enumerate(_needed(stop_at, budgets))] == [True] * n


def test_short_texts_leave_their_rows_to_waiting_prompts_within_one_round():
    stop_at = [1, 2, 0, 3, 1, 2, 0, 1]
    runs, _ = _run(_scheduler([5] * 8, max_rows=3, max_new=40), stop_at)
    assert {round_ for round_, _, _ in runs.values()} == {0}
    assert [start for _, start, _ in runs.values()] == [0, 0, 0, 3, 3, 3, 7, 7]


def test_ragged_texts_drop_their_finished_rows_once():
    stop_at = [1, 2, 0, None, 1, 2, 0, None]
    _, compactions = _run(_scheduler([5] * 8, max_rows=8, max_new=64), stop_at)
    assert compactions == [[3, 7]]
