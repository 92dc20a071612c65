"""Error rows at the end of a run: the allowance (--max-errors, --allow-errors) and their causes.
A whole run's exit status with error rows is in test_run_edges.py."""
import pytest

from twig_batch.errors import InputError
from twig_batch.io.row_errors import ErrorAllowance, common_causes


def test_allowances():
    assert ErrorAllowance.parse(None).allows(0, 10) and not ErrorAllowance.parse(None).allows(1, 10)
    assert ErrorAllowance.parse("10%").allows(1, 10) and not ErrorAllowance.parse("10%").allows(2, 10)
    assert ErrorAllowance.parse(None, allow_all=True).allows(10, 10)
    for bad in ("-1", "ten", "150%"):
        with pytest.raises(InputError, match="--max-errors takes"):
            ErrorAllowance.parse(bad)
    with pytest.raises(InputError, match="pass one"):
        ErrorAllowance.parse("3", allow_all=True)


def test_causes_that_differ_only_in_numbers_are_one():
    causes = common_causes(["prompt is too long: 900 tokens, the limit is 500",
                            "prompt is too long: 812 tokens, the limit is 500", "prompt is empty"])
    assert causes == [("prompt is too long: 900 tokens, the limit is 500", 2), ("prompt is empty", 1)]
