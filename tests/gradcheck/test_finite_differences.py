"""Finite differences against the oracle, and the directional check's power to reject.

Tolerance: with h = 1e-6 in float64 the central difference is off by ~ε|F|/h + h²|F'''|/6
≈ 1e-10 for these O(1) objectives; rtol 1e-6 leaves four orders of magnitude of headroom and
still rejects every wrong meta-gradient below (errors of 1e-3 relative and up).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradcheck import Task, compare, finite_differences, oracle
from tests.helpers import conv_bn, image_task, mlp, mlp_problems, regression_task

RTOL, ATOL = 1e-6, 1e-9


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
    assert len(report.directions) == 6 and report.rtol == 1e-6


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
    assert not report.ok()
    with pytest.raises(AssertionError, match="numerical"):
        report.assert_close()


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
    finite_differences.check(g, model, task, 3, 0.05, directions=4).assert_close()


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
