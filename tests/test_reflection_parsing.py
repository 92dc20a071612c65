import pytest

from twig_batch.pipeline.reflection import read_reflection


def test_a_clean_answer_is_read_and_judged_against_theta():
    low = read_reflection("Score: 42\nBetter: a red cube on a wooden table.", band=1, theta=90)
    assert (low.score, low.improved, low.accepted, low.parse_failed, low.problem) == (
        42.0, "a red cube on a wooden table.", False, False, None)
    assert low.band == 1 and low.answer.startswith("Score: 42")
    high = read_reflection("score = 90\nimproved description: the sky", band=0, theta=90)
    assert high.accepted and not high.parse_failed and high.score == 90.0 and high.improved == "the sky"
    assert not read_reflection("Score: 89.5\nBetter: x", 0, 90).accepted
    assert read_reflection("Score: 10\nBetter: x", 0, 0).accepted


@pytest.mark.parametrize("answer, problem", [
    ("", "unparseable"),
    ("sky tree blue lamp", "unparseable"),
    ("Score: 150\nBetter: a cube", "score out of range"),
    ("Score: -5\nBetter: a cube", "score out of range"),
    ("Score: 12", "missing improved description"),
    ("Score: 12\nBetter:   ", "missing improved description"),
    ("Better: a blue sphere", "missing score"),
])
def test_answers_that_cannot_be_used_are_accepted_and_flagged(answer, problem):
    reflection = read_reflection(answer, band=2, theta=90)
    assert reflection.accepted and reflection.parse_failed and reflection.problem == problem
    assert reflection.answer == answer
    record = reflection.record()
    assert record["accepted"] is True and record["parse_failed"] is True and record["problem"] == problem
