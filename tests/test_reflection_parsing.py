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


@pytest.mark.parametrize("answer, score, improved", [
    # The labels upstream's template asks for, the description running over several lines.
    ("SCORE: 87\nIMPROVED_DESCRIPTION: A tall red lighthouse\nstands on dark rocks,\n  waves below.", 87.0,
     "A tall red lighthouse stands on dark rocks, waves below."),
    ("IMPROVED_DESCRIPTION:\nGreen hills under a pale sky.\nSCORE: 64", 64.0, "Green hills under a pale sky."),
    ("improved_description: green hills\nscore: 64", 64.0, "green hills"),
    # Bold and heading markers, a trailing /100, a value in brackets, a note after the label.
    ("**Score:** 83/100\n**Improved description:** A calm sea.", 83.0, "A calm sea."),
    ("**SCORE**: 83 / 100\n**IMPROVED_DESCRIPTION**: A calm sea.", 83.0, "A calm sea."),
    ("## SCORE: [76]\n__IMPROVED_DESCRIPTION__: [Brown wooden planks.]", 76.0, "Brown wooden planks."),
    ("Score (0-100): 58\nBetter description = \"a grey cat\"", 58.0, "a grey cat"),
    ("Score:\n91\nBetter: a cube", 91.0, "a cube"),
    # Either order on one line; a bare "score" inside the description is part of its text.
    ("Better: a cube. Score: 33", 33.0, "a cube."),
    ("IMPROVED_DESCRIPTION: a board showing score 5 in white\nSCORE: 71", 71.0, "a board showing score 5 in white"),
])
def test_both_answer_formats_and_their_usual_variations_are_read(answer, score, improved):
    reflection = read_reflection(answer, band=0, theta=90)
    assert (reflection.score, reflection.improved, reflection.parse_failed) == (score, improved, False)
    assert reflection.accepted is (score >= 90)


def test_a_score_out_of_another_scale_is_not_taken_for_a_percentage():
    reflection = read_reflection("Score: 8/10\nBetter: a cube", band=0, theta=90)
    assert reflection.accepted and reflection.parse_failed and reflection.problem == "score not out of 100"
