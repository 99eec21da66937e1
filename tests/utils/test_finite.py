"""utils/finite.py: the one check for NaN and infinity that every phase uses (issue 20)."""
import math

import pytest
import torch

from utils.finite import NonFiniteError, all_finite, describe_nonfinite, first_nonfinite_key, first_nonfinite_row


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_all_finite_finds_nan_and_both_infinities(bad):
    x = torch.zeros(4, 3)
    assert all_finite(x) and all_finite([x, torch.ones(2)]) and all_finite([])
    x[2, 1] = bad
    assert not all_finite(x) and not all_finite([torch.ones(2), x])
    assert first_nonfinite_row(x) == 2
    assert all_finite(torch.arange(3))  # integers are finite


def test_first_row_and_key_and_description():
    x = torch.ones(5, 2, 2)
    assert first_nonfinite_row(x) is None and first_nonfinite_row(torch.zeros(0, 3)) is None
    x[3, 0, 1], x[4, 1, 1] = math.nan, math.inf
    assert first_nonfinite_row(x) == 3
    assert describe_nonfinite(x) == "1 nan, 1 inf of 20 values"
    sd = {"a.weight": torch.ones(3), "steps": torch.tensor(7), "b.weight": x, "c.bias": torch.tensor([math.nan])}
    assert first_nonfinite_key(sd) == "b.weight"
    assert first_nonfinite_key({"a": torch.ones(2), "n": torch.tensor(3)}) is None


def test_the_error_is_one_line_with_its_parts():
    e = NonFiniteError("meta-test: the inner loop gave non-finite logits in episode 3 (of 600)",
                       "Lower --base_lr (set to 1e+38) or --test_update_step (set to 100)", kind="logits")
    assert str(e) == ("meta-test: the inner loop gave non-finite logits in episode 3 (of 600); nothing was written. "
                      "Lower --base_lr (set to 1e+38) or --test_update_step (set to 100)")
    assert e.kind == "logits" and "\n" not in str(e)
