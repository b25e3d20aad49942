"""Finite differences against the oracle, and the directional check's power to reject.

Tolerances: the coordinate-wise differences are compared at gradcheck.tolerances.COORDINATEWISE
(rtol 1e-6, atol 1e-9): with h = 1e-6 in float64 the central difference is off by
~ε|F|/h + h²|F'''|/6 ≈ 1e-10 for these O(1) objectives, four orders of magnitude below. The
directional check takes the candidate's precision from the one table (1e-9 for float64, 1e-3 for
float32) and adds its own error bound E.

The smallest error rejected: a gradient off by 1e-5 relative, in n = 2,690 dimensions. Along a
random unit u, ⟨δg, u⟩ ≈ 1e-5 ‖g‖/√n ≈ 2·10⁻⁷ ‖g‖ (for g(1 + 1e-5) it is exactly 1e-5 ⟨g, u⟩),
while the check allows its error bound E ≈ δ/h = 64 ε max|F| / h ≈ 10⁻⁸ (the rounding term
dominates at h = 1e-6; F ≈ 0.5 here) plus rtol · max(|D(h)|, ‖g‖/√n) ≈ 1e-9 · 0.02, so E
dominates: an error of 1e-5 relative to ⟨g, u⟩ exceeds the allowance on every direction
(measured).
n is large enough for the typical size ‖g‖/√n to matter: with ‖g‖ in its place the allowance
would be √n ≈ 52 times larger and both perturbations would pass.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradcheck import Task, compare, finite_differences, oracle
from gradcheck.parameters import flat
from gradcheck.tolerances import COORDINATEWISE
from tests.helpers import conv_bn, image_task, mlp, mlp_problems, regression_task

RTOL, ATOL = COORDINATEWISE


@given(
    problem=mlp_problems(),
    steps=st.integers(1, 4),
    inner_lr=st.floats(0.01, 0.4),
    leap=st.floats(0.1, 1.0),
    adapt=st.sampled_from([None, "head"]),
)
def test_coordinatewise_finite_differences_match_oracle(problem, steps, inner_lr, leap, adapt):
    model, task = problem
    kwargs = dict(adapt=adapt, leap=leap)
    fd = finite_differences.meta_gradient(model, task, steps, inner_lr, **kwargs)
    compare(oracle.meta_gradient(model, task, steps, inner_lr, **kwargs), fd).assert_close(RTOL, ATOL)


def test_finite_differences_conv_batchnorm_train_mode():
    model, task = conv_bn().train(), image_task()
    fd = finite_differences.meta_gradient(model, task, 2, 0.1, adapt="body")
    compare(oracle.meta_gradient(model, task, 2, 0.1, adapt="body"), fd).assert_close(RTOL, ATOL)


def test_directional_check_accepts_oracle():
    model, task = mlp([3, 16, 16, 2], "softplus"), regression_task(inputs=3, outputs=2)
    g = oracle.meta_gradient(model, task, 5, 0.2, leap=0.5)
    report = finite_differences.check(g, model, task, 5, 0.2, leap=0.5, directions=6, seed=3)
    report.assert_close()
    assert len(report.directions) == 6 and report.rtol == 1e-9  # float64: the table's entry
    assert all(d.ok and d.step == 1e-6 for d in report.directions)
    assert "ok — 6 agree, 0 disagree, 0 inconclusive of 6" in str(report)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda g, fo: fo, id="first-order"),
        pytest.param(lambda g, fo: {n: 1.001 * t for n, t in g.items()}, id="scaled-by-1.001"),
        pytest.param(lambda g, fo: {n: -t for n, t in g.items()}, id="sign-flipped"),
    ],
)
def test_directional_check_rejects_wrong_gradients(corrupt):
    model, task = mlp([3, 16, 16, 2], "softplus"), regression_task(inputs=3, outputs=2)
    g = oracle.meta_gradient(model, task, 5, 0.2)
    fo = oracle.meta_gradient(model, task, 5, 0.2, first_order=True)
    report = finite_differences.check(corrupt(g, fo), model, task, 5, 0.2, directions=4)
    assert not report.ok() and report.failed and not report.inconclusive
    assert "MISMATCH" in str(report) and "FAIL" in str(report)
    with pytest.raises(AssertionError, match=r"u \d+: numerical .* vs analytical .*: \|difference\|"):
        report.assert_close()


def _perturbed(g, seed=1):
    """g plus a random vector of norm 1e-5 ‖g‖ (seeded apart from the check's directions)."""
    generator = torch.Generator().manual_seed(seed)
    noise = {n: torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in g.items()}
    scale = 1e-5 * flat(g).norm() / flat(noise).norm()
    return {n: t + scale * noise[n] for n, t in g.items()}


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda g: {n: (1 + 1e-5) * t for n, t in g.items()}, id="scaled-by-1+1e-5"),
        pytest.param(_perturbed, id="plus-1e-5-relative-noise"),
    ],
)
def test_directional_check_rejects_a_gradient_off_by_1e_5_relative(corrupt):
    model, task = mlp([4, 48, 48, 2]), regression_task(inputs=4, outputs=2)
    assert sum(p.numel() for p in model.parameters()) == 2690
    g = oracle.meta_gradient(model, task, 3, 0.3)
    finite_differences.check(g, model, task, 3, 0.3).assert_close()  # the exact one passes
    report = finite_differences.check(corrupt(g), model, task, 3, 0.3)
    assert len(report.failed) >= 4 and not report.inconclusive, str(report)  # 8 of 8 measured


def test_directional_check_float32_model_upcasts_a_copy():
    model, task = mlp([2, 8, 1]).float(), regression_task(dtype=torch.float32)
    g = oracle.meta_gradient(model, task, 3, 0.2)
    report = finite_differences.check(g, model, task, 3, 0.2)
    assert report.rtol == 1e-3  # a float32 candidate is held to float32 precision
    report.assert_close()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_directional_check_on_a_100k_parameter_network():
    model, task = mlp([8, 256, 256, 128, 4]), regression_task(inputs=8, outputs=4, shots=16, queries=16)
    assert sum(p.numel() for p in model.parameters()) >= 100_000
    g = oracle.meta_gradient(model, task, 3, 0.05)
    report = finite_differences.check(g, model, task, 3, 0.05, directions=8)
    report.assert_close()
    assert all(d.step == 1e-6 for d in report.directions)  # smooth: judged at h, no retries


def test_same_seed_same_directions():
    model, task = mlp([2, 4, 1]), regression_task()
    g = oracle.meta_gradient(model, task, 2, 0.1)
    a = finite_differences.check(g, model, task, 2, 0.1, seed=7)
    b = finite_differences.check(g, model, task, 2, 0.1, seed=7)
    c = finite_differences.check(g, model, task, 2, 0.1, seed=8)
    assert [d.analytic for d in a.directions] == [d.analytic for d in b.directions]
    assert [d.analytic for d in a.directions] != [d.analytic for d in c.directions]


def test_closure_task_needs_float64():
    model32 = mlp([2, 4, 1]).float()
    x = torch.randn(5, 2)
    task = Task.from_closures(lambda f: f(x).pow(2).mean(), lambda f: f(x).sum().tanh())
    with pytest.raises(ValueError, match="float64"):
        finite_differences.meta_gradient(model32, task, 2, 0.1)
    model64, x64 = mlp([2, 4, 1]), x.double()
    task64 = Task.from_closures(lambda f: f(x64).pow(2).mean(), lambda f: f(x64).sum().tanh())
    fd = finite_differences.meta_gradient(model64, task64, 2, 0.1)
    compare(oracle.meta_gradient(model64, task64, 2, 0.1), fd).assert_close(RTOL, ATOL)


def test_coordinatewise_refuses_large_models():
    model, task = mlp([2, 50, 1]), regression_task()
    with pytest.raises(ValueError, match=r"finite_differences\.check"):
        finite_differences.meta_gradient(model, task, 1, 0.1, max_parameters=100)


def test_check_refuses_gradient_with_wrong_keys():
    model, task = mlp([2, 4, 1]), regression_task()
    g = oracle.meta_gradient(model, task, 1, 0.1)
    del g["0.bias"]
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        finite_differences.check(g, model, task, 1, 0.1)


def test_a_float32_candidate_is_held_to_float32_precision_of_the_typical_projection():
    """rtol 1e-3 (float32) scales the typical size of ⟨g, u⟩, ‖g‖/√n — not ‖g‖, which is √n ≈ 52
    times larger here: the exact gradient cast to float32 (relative rounding ~1e-7) passes, and
    one off by 3% of ‖g‖ (≈ 6e-4 ‖g‖ along a random direction, above 1e-3 ‖g‖/√n ≈ 2e-5 ‖g‖ but
    below 1e-3 ‖g‖) fails."""
    model, task = mlp([4, 48, 48, 2]), regression_task(inputs=4, outputs=2)
    g = oracle.meta_gradient(model, task, 3, 0.3)
    as32 = {n: t.float() for n, t in g.items()}
    assert finite_differences.check(as32, model, task, 3, 0.3).ok()
    generator = torch.Generator().manual_seed(3)
    noise = {n: torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in g.items()}
    scale = 3e-2 * flat(g).norm() / flat(noise).norm()
    off = {n: (t + scale * noise[n]).float() for n, t in g.items()}
    report = finite_differences.check(off, model, task, 3, 0.3)
    assert report.rtol == 1e-3 and len(report.failed) >= 4, str(report)
