import math

import pytest
import torch

from gradcheck import compare

F64 = torch.float64


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
