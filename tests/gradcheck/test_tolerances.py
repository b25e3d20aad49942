"""gradcheck.tolerances: one table by dtype, and the defaults every verdict takes from it.

The float64 entry is tested from both sides with independent computations: two correct
implementations (the oracle, and the flat-vector unroll of tests.helpers) agree far inside it,
and the smallest real bug the suite keeps — α held as a float32 tensor, a relative change of
~4e-8 in α — falls outside it.
"""

import pytest
import torch

from gradcheck import compare, oracle, tolerances
from tests.helpers import mlp, reference_meta_gradient, regression_task


def test_the_table_and_its_defaults():
    assert tolerances.PRECISIONS[torch.float64] == 1e-9
    assert tolerances.PRECISIONS[torch.float32] == 1e-3
    assert tolerances.ATOL == 0.0
    assert max(tolerances.PRECISIONS.values()) == tolerances.COARSEST


@pytest.mark.parametrize(
    ("dtypes", "rtol"),
    [
        ([torch.float64], 1e-9),
        ([torch.float64, torch.float32], 1e-3),  # the coarsest floating dtype decides
        ([torch.float16], 5e-2),
        ([torch.int64], 1e-9),  # nothing floating: float64's
        ([torch.float64, torch.int64], 1e-9),
    ],
)
def test_default_rtol_is_the_coarsest_floating_dtypes(dtypes, rtol):
    gradient = {f"p{i}": torch.zeros(2, dtype=d) for i, d in enumerate(dtypes)}
    assert tolerances.default_rtol(gradient) == rtol
    assert tolerances.default_rtol(gradient.values()) == rtol


def test_float64_entry_passes_two_correct_implementations_and_fails_a_float32_alpha():
    model, task = mlp([2, 5, 1]), regression_task()
    exact = oracle.meta_gradient(model, task, 4, 0.3)
    assert compare(reference_meta_gradient(model, task, 4, 0.3), exact).ok()  # the default: 1e-9
    alpha32 = float(torch.tensor(0.3, dtype=torch.float32))
    assert not compare(reference_meta_gradient(model, task, 4, alpha32), exact).ok()


def test_report_defaults_come_from_the_candidates_dtype():
    exact = {"w": torch.ones(3, dtype=torch.float64)}
    close32 = {"w": torch.full((3,), 1 + 1e-5, dtype=torch.float32)}
    assert compare(close32, exact).ok()  # float32's 1e-3
    assert not compare({"w": close32["w"].double()}, exact).ok()  # float64's 1e-9
