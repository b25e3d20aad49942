"""The lazy meta-gradient (lazymaml.lazy): K = 1 identity, K = 0, a closed form of its deviation,
finite differences — and the broken variants that the identity catches. The deviation bound is
tested in test_bound.py, the Hessian-vector product in test_derivatives.py, the graph form in
test_graph.py.

Tolerances: identities between float64 computations are asserted to rtol 1e-10 (rounding
differences measured below 1e-13); finite differences to rtol 1e-6 (see
tests/gradcheck/test_finite_differences).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lazymaml
from gradcheck import Task, compare, finite_differences, oracle
from gradcheck.settings import InnerLoop
from gradcheck.student import Student
from lazymaml.derivatives import query_gradient
from tests.helpers import conv_bn, image_task, mlp, mlp_problems, regression_task

RTOL, ATOL = 1e-10, 1e-13
ADAPT = st.sampled_from([None, "head", "body"])


def lazy(model, task, steps, inner_lr, leap=1.0, eta=None, adapt=None):
    return lazymaml.meta_gradient(
        model, task, steps, inner_lr, adapt=adapt, leap=leap, jacobian_step="single" if eta is None else eta
    )


# Deliberately broken variants, assembled from the same building blocks as the real thing.
def _blocks(model, task, steps, inner_lr, leap, adapt):
    student = Student.read(model, adapt)
    phi_t, frozen = student.teacher(task, InnerLoop(steps, inner_lr, leap))
    return student, phi_t, frozen


def hvp_at_student(model, task, steps, inner_lr, leap=1.0, eta=None, adapt=None):
    student, phi_t, frozen = _blocks(model, task, steps, inner_lr, leap, adapt)
    v, _ = query_gradient(student, task, phi_t, frozen)
    phi_k, _ = student.run(task, InnerLoop(steps, inner_lr))
    h = lazymaml.hvp(student, task, phi_k, v)  # wrong: the Jacobian is the one of a step taken at θ
    return {n: v[n] - (eta or leap * inner_lr) * h[n] for n in v}


def eta_doubled(model, task, steps, inner_lr, leap=1.0, eta=None, adapt=None):
    return lazy(model, task, steps, inner_lr, leap, 2 * (eta or leap * inner_lr), adapt)


def leap_applied_twice(model, task, steps, inner_lr, leap=1.0, eta=None, adapt=None):
    student, phi_t, frozen = _blocks(model, task, steps, inner_lr, leap, adapt)
    twice = {n: t + leap * (phi_t[n] - t) for n, t in student.theta.items()}
    v, _ = query_gradient(student, task, twice, frozen)
    h = lazymaml.hvp(student, task, student.theta, v)
    return {n: v[n] - (eta or leap * inner_lr) * h[n] for n in v}


def create_graph_missing(model, task, steps, inner_lr, leap=1.0, eta=None, adapt=None):
    student, phi_t, frozen = _blocks(model, task, steps, inner_lr, leap, adapt)
    return query_gradient(student, task, phi_t, frozen)[0]  # the HVP term silently vanishes


BROKEN = [hvp_at_student, eta_doubled, leap_applied_twice, create_graph_missing]


def k1_identity(estimator, model, task, inner_lr, leap, adapt):
    got = estimator(model, task, 1, inner_lr, leap, adapt=adapt)
    return compare(got, oracle.meta_gradient(model, task, 1, inner_lr, adapt=adapt, leap=leap))


@given(problem=mlp_problems(), inner_lr=st.floats(0.01, 0.5), leap=st.floats(0.05, 1.0), adapt=ADAPT)
def test_k1_lazy_equals_exact(problem, inner_lr, leap, adapt):
    model, task = problem
    k1_identity(lazy, model, task, inner_lr, leap, adapt).assert_close(RTOL, ATOL)


@pytest.mark.parametrize("adapt", [None, "head", "body"])
@pytest.mark.parametrize("train", [True, False])
def test_k1_lazy_equals_exact_conv_batchnorm(adapt, train):
    k1_identity(lazy, conv_bn().train(train), image_task(), 0.2, 0.7, adapt).assert_close(RTOL, ATOL)


def test_k0_is_the_query_gradient():
    model, task = mlp([2, 4, 1]), regression_task()
    for eta in ("single", "horizon", 0.3):
        compare(
            lazymaml.meta_gradient(model, task, 0, 0.2, jacobian_step=eta),
            oracle.meta_gradient(model, task, 0, 0.2),
        ).assert_close(RTOL, ATOL)


@pytest.mark.parametrize("steps", [1, 2, 4, 10])
@pytest.mark.parametrize(("adapt", "leap"), [(None, 1.0), (None, 0.5), ("weight", 0.8)])
def test_quadratic_deviation_closed_form(steps, adapt, leap):
    """For MSE on a linear model H is constant: g_exact − g_lazy = γ Tᵀ((Tᵀ)^{K−1} − I) v, T = I − αE_A H."""
    torch.manual_seed(steps)
    d, n, alpha = 3, 10, 0.2
    model = torch.nn.Linear(d, 1).double()
    xs, xq = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    task = Task(
        (xs, torch.randn(n, 1, dtype=torch.float64)),
        (xq, torch.randn(n, 1, dtype=torch.float64)),
        torch.nn.functional.mse_loss,
    )
    zs = torch.cat([xs, torch.ones(n, 1, dtype=torch.float64)], 1)
    mask = torch.tensor([1.0] * d + [float(adapt is None)], dtype=torch.float64)
    transition = torch.eye(d + 1, dtype=torch.float64) - alpha * mask[:, None] * (2 * zs.T @ zs / n)
    student = Student.read(model, adapt)
    v, _ = query_gradient(student, task, *student.teacher(task, InnerLoop(steps, alpha, leap)))
    v = torch.cat([v["weight"].reshape(-1), v["bias"]])
    closed = (
        leap
        * transition.T
        @ (torch.linalg.matrix_power(transition.T, steps - 1) - torch.eye(d + 1, dtype=torch.float64))
        @ v
    )

    exact = oracle.meta_gradient(model, task, steps, alpha, adapt=adapt, leap=leap)
    got = lazy(model, task, steps, alpha, leap, adapt=adapt)
    deviation = torch.cat([(exact[k] - got[k]).reshape(-1) for k in ("weight", "bias")])
    torch.testing.assert_close(deviation, closed, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("adapt", [None, "head", "body"])
def test_lazy_at_k1_equals_finite_differences(adapt):
    model, task = mlp([2, 5, 5, 1], "tanh"), regression_task()
    fd = finite_differences.meta_gradient(model, task, 1, 0.3, adapt=adapt, leap=0.6)
    compare(lazy(model, task, 1, 0.3, 0.6, adapt=adapt), fd).assert_close(rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("broken", BROKEN, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("leap", "adapt"), [(0.6, None), (0.6, "head"), (0.6, "body")])
def test_broken_variants_fail_the_k1_identity(broken, leap, adapt):
    """Each planted bug is caught by the identity test (measured relative errors 0.07 to 0.66,
    against a tolerance of 1e-10); the bound, loose by design, is not what catches them."""
    model, task = mlp([2, 5, 5, 1], "tanh"), regression_task()
    report = k1_identity(broken, model, task, 0.3, leap, adapt)
    assert not report.ok(rtol=1e-6)
    with pytest.raises(AssertionError):
        report.assert_close(RTOL, ATOL)


def test_other_inner_optimizers_drive_only_the_student():
    model, task = mlp([2, 6, 1]), regression_task()
    adam = lazymaml.meta_gradient(model, task, 5, 0.05, inner_optimizer="adam")
    factory = lazymaml.meta_gradient(
        model, task, 5, 0.05, inner_optimizer=lambda p: torch.optim.Adam(p, lr=0.05)
    )
    # "adam" is the pure update of gradcheck.optim, the factory torch.optim.Adam itself: the same
    # arithmetic in another order, equal to rounding
    compare(adam, factory).assert_close(RTOL, ATOL)
    student = Student.read(model)
    phi_t, frozen = student.teacher(task, InnerLoop(5, 0.05, inner_optimizer="adam"))
    v, _ = query_gradient(student, task, phi_t, frozen)
    h = lazymaml.hvp(student, task, student.theta, v)
    compare(adam, {n: v[n] - 0.05 * h[n] for n in v}).assert_close(RTOL, ATOL)
