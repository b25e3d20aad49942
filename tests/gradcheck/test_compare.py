"""compare(): the figures, the norm-wise verdict, and rows whose reference is ≈0.

≈0 is ‖r_row‖ ≤ √ε ‖r‖ (see gradcheck.compare); the tests place references just either side of
that threshold, put rounding noise (1e-16 relative) on a zero-gradient row, and check that a
wrong value on such a row (1e-4) still fails at rtol = 1e-9. The defaults of ``ok()`` and
``assert_close()`` are the candidate's precision from gradcheck.tolerances (1e-9 for float64,
1e-3 for float32) and atol 0; the tests place errors just either side of them.
"""

import math

import pytest
import torch

from gradcheck import compare
from gradcheck.tolerances import ATOL, PRECISIONS, default_rtol

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


def grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g, dtype=F64), "b": torch.randn(4, generator=g, dtype=F64)}


def test_identical_gradients():
    report = compare(grads(), grads())
    assert report.ok(rtol=0, atol=0)
    assert [r.name for r in report.rows] == ["w", "b"]
    assert all(r.cosine == pytest.approx(1.0) and r.rel_error == 0 for r in (*report.rows, report.overall))


def test_figures_are_exact():
    ref = grads()
    cand = {"w": ref["w"] * 1.5, "b": -ref["b"]}
    report = compare(cand, ref)
    w, b = report.rows
    assert w.cosine == pytest.approx(1.0) and w.rel_error == pytest.approx(0.5)
    assert w.max_abs_error == pytest.approx(0.5 * ref["w"].abs().max().item())
    assert b.cosine == pytest.approx(-1.0) and b.rel_error == pytest.approx(2.0)
    assert w.candidate_norm == pytest.approx(1.5 * ref["w"].norm().item())
    assert b.reference_norm == pytest.approx(ref["b"].norm().item())
    diff = torch.cat([0.5 * ref["w"].reshape(-1), -2 * ref["b"]])
    assert report.overall.rel_error == pytest.approx(
        diff.norm().item() / torch.cat([ref["w"].reshape(-1), ref["b"]]).norm().item()
    )
    assert report.overall.shape == (16,)


def test_ok_is_normwise_with_atol_and_rtol():
    ref = grads()
    cand = {k: v + 1e-3 * v.norm() / math.sqrt(v.numel()) for k, v in ref.items()}
    report = compare(cand, ref)
    assert report.ok(rtol=2e-3, atol=0)
    assert not report.ok(rtol=5e-4, atol=0)
    assert report.ok(rtol=0, atol=1e-2)


def test_zero_reference():
    zeros = {"w": torch.zeros(2)}
    assert compare(zeros, zeros).ok(rtol=0, atol=0)
    report = compare({"w": torch.tensor([1e-12, 0.0])}, zeros)
    assert report.rows[0].rel_error == math.inf and report.rows[0].cosine == 0.0
    assert report.ok(atol=1e-9) and not report.ok(atol=0)


def test_non_finite_candidate_fails():
    cand = grads()
    cand["b"][0] = float("nan")
    assert not compare(cand, grads()).ok(rtol=1e9, atol=1e9)


def test_mismatches_are_listed_not_crashed_on():
    ref = grads()
    cand = {"w": ref["w"].T, "extra": torch.zeros(1)}
    report = compare(cand, ref)
    assert report.missing == ["b"] and report.unexpected == ["extra"]
    assert report.mismatched == [("w", (4, 3), (3, 4))]
    assert not report.ok(rtol=1, atol=1)
    text = str(report)
    assert "missing from candidate: b" in text and "not in reference: extra" in text
    assert "shape mismatch: w candidate (4, 3) vs reference (3, 4)" in text


def test_assert_close_carries_the_table():
    ref = grads()
    cand = {"w": ref["w"], "b": ref["b"] * 1.01}
    compare(cand, ref).assert_close(rtol=0.02)
    with pytest.raises(AssertionError) as info:
        compare(cand, ref).assert_close(rtol=1e-3)
    message = str(info.value)
    assert "failing: b, overall" in message
    lines = message.splitlines()
    assert any(line.startswith("b ") and line.endswith("FAIL") for line in lines)
    assert any(line.startswith("w ") and not line.endswith("FAIL") for line in lines)


def test_table_is_aligned():
    text = compare(grads(), grads(1)).table()
    widths = {len(line) for line in text.splitlines()}
    assert len(widths) == 1


def test_mixed_precision_compares_in_float64():
    ref = grads()
    cand = {k: v.float() for k, v in ref.items()}
    report = compare(cand, ref)
    assert 0 < report.overall.rel_error < 1e-7


def test_bad_arguments():
    with pytest.raises(TypeError, match="candidate must be a mapping"):
        compare([torch.zeros(1)], grads())
    with pytest.raises(TypeError, match=r"reference values must be tensors; not for \['w'\]"):
        compare(grads(), {"w": 1.0})


def test_ok_checks_the_overall_row_too():
    """Two rows with zero references, each error just under atol: every row passes, the
    overall error √2 · 0.9 atol does not (kills ``Report.ok`` ignoring the overall row)."""
    atol = 1e-6
    zeros = {"a": torch.zeros(1, dtype=F64), "b": torch.zeros(1, dtype=F64)}
    cand = {k: torch.full((1,), 0.9 * atol, dtype=F64) for k in zeros}
    report = compare(cand, zeros)
    assert all(report.passes(r, 0.0, atol) for r in report.rows)
    assert report.overall.abs_error == pytest.approx(math.sqrt(2) * 0.9 * atol)
    assert not report.ok(rtol=0.0, atol=atol)
    assert report.failing(0.0, atol) == ["overall"]
    assert report.ok(rtol=0.0, atol=1.3 * atol)


def conv_bias_before_batchnorm(noise=1e-16, error=0.0):
    """A gradient whose "bias" row is 0 in truth and rounding noise as computed."""
    g = torch.Generator().manual_seed(0)
    ref = {
        "w": torch.randn(50, generator=g, dtype=F64),
        "bias": noise * torch.randn(4, generator=g, dtype=F64),
    }
    cand = {"w": ref["w"] * (1 + 1e-15), "bias": noise * torch.randn(4, generator=g, dtype=F64) + error}
    return cand, ref


def test_a_zero_gradient_row_shows_its_absolute_error_not_a_ratio_of_noises():
    cand, ref = conv_bias_before_batchnorm()
    report = compare(cand, ref)
    bias = report.rows[1]
    assert bias.rel_error > 0.5  # noise over noise: the figure that alarmed users
    assert report.negligible(bias) and not report.negligible(report.rows[0])
    assert report.ok(rtol=1e-9, atol=0.0)  # judged against its share of the overall tolerance
    line = next(line for line in report.table().splitlines() if line.startswith("bias"))
    assert "≈0 reference" in line and f"{bias.abs_error:.2e}" in line and "—" in line
    assert f"{bias.rel_error:.2e}" not in line
    assert "≈0 reference: |r| ≤ √ε·|r overall|" in report.table()


def test_a_wrong_value_on_a_zero_gradient_row_still_fails():
    cand, ref = conv_bias_before_batchnorm(error=1e-4)
    report = compare(cand, ref)
    assert report.negligible(report.rows[1])
    assert not report.ok(rtol=1e-9, atol=0.0) and report.failing(1e-9, 0.0) == ["bias", "overall"]
    # its share of the tolerance: rtol · ‖r‖ · √(4/54) for 4 of 54 entries
    bias = report.rows[1]
    share = report.overall.reference_norm * math.sqrt(4 / 54)
    assert report.scale(bias) == pytest.approx(share)
    assert report.passes(bias, rtol=1.01 * bias.abs_error / share, atol=0.0)
    assert not report.passes(bias, rtol=0.99 * bias.abs_error / share, atol=0.0)


@pytest.mark.parametrize("factor", [0.99, 1.01])
def test_negligible_is_exactly_below_sqrt_eps_of_the_overall_norm(factor):
    w = torch.zeros(100, dtype=F64)
    w[0] = 1.0
    b = torch.zeros(1, dtype=F64)
    b[0] = factor * math.sqrt(EPS64) * 1.0  # ‖r‖ is 1 to within ε
    report = compare({"w": w, "b": b}, {"w": w, "b": b})
    assert report.negligible(report.rows[1]) == (factor < 1)
    assert not report.negligible(report.overall)


def test_negligible_uses_the_coarser_dtype():
    ref = {"w": torch.ones(4, dtype=F64), "b": torch.full((1,), 1e-5, dtype=F64)}
    assert not compare(ref, ref).negligible(compare(ref, ref).rows[1])  # 1e-5 > √ε64 = 1.5e-8
    cand = {k: v.float() for k, v in ref.items()}
    report = compare(cand, ref)
    assert report.eps == torch.finfo(torch.float32).eps
    assert report.negligible(report.rows[1])  # 1e-5 < 2 · √ε32 = 6.9e-4


def test_all_zero_reference_rows_are_held_to_atol():
    zeros = {"w": torch.zeros(3, dtype=F64)}
    report = compare({"w": torch.full((3,), 1e-12, dtype=F64)}, zeros)
    assert report.negligible(report.rows[0]) and report.scale(report.rows[0]) == 0.0
    assert not report.ok(rtol=1.0, atol=0.0) and report.ok(rtol=0.0, atol=1e-11)


def test_table_is_aligned_with_zero_reference_rows():
    cand, ref = conv_bias_before_batchnorm()
    lines = compare(cand, ref).table(1e-9, 0.0).splitlines()
    rows = [line for line in lines if not line.startswith(("≈0", " "))]
    assert len({len(line) for line in rows}) == 1


def test_default_rtol_follows_the_coarsest_dtype():
    assert default_rtol({"a": torch.zeros(1, dtype=F64)}) == 1e-9
    assert default_rtol({"a": torch.zeros(1, dtype=F64), "b": torch.zeros(1)}) == 1e-3
    assert default_rtol({"a": torch.zeros(1, dtype=torch.bfloat16)}) == 5e-2


def test_default_rtol_ignores_integer_tensors_and_defaults_to_float64():
    assert default_rtol({"n": torch.zeros(1, dtype=torch.int64)}) == PRECISIONS[F64]
    assert default_rtol([torch.zeros(1, dtype=torch.float16)]) == 5e-2


@pytest.mark.parametrize(("dtype", "rtol"), [(F64, 1e-9), (torch.float32, 1e-3)])
def test_report_defaults_to_the_candidates_precision_and_atol_0(dtype, rtol):
    """A relative error of 0.5 rtol passes the default verdict, 2 rtol fails it; the reference's
    dtype does not matter (float64 here), the candidate's does."""
    ref = grads()
    for factor, passes in ((0.5, True), (2.0, False)):
        cand = {k: (v * (1 + factor * rtol)).to(dtype) for k, v in ref.items()}
        report = compare(cand, ref)
        assert report.rtol == rtol and report.ok() == passes
        assert report.ok() == report.ok(rtol, ATOL) and report.failing() == report.failing(rtol, 0.0)
        if not passes:
            with pytest.raises(AssertionError, match=f"rtol={rtol:g}, atol=0;"):
                report.assert_close()


def test_default_atol_is_0():
    zeros = {"w": torch.zeros(2, dtype=F64)}
    assert not compare({"w": torch.full((2,), 1e-100, dtype=F64)}, zeros).ok()
