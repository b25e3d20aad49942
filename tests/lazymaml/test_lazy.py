"""The lazy meta-gradient: K = 1 identity, the deviation bound, closed forms, finite differences,
the graph form — and the broken variants that each of these properties catches.

Tolerances: identities between float64 computations are asserted to rtol 1e-10 (rounding
differences measured below 1e-13); the bound is compared with a relative slack of 1e-9 for the
rounding in the norms; finite differences to rtol 1e-6 (see tests/gradcheck/test_finite_differences).
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
from tests.helpers import Flat, conv_bn, image_task, mlp, mlp_problems, regression_task

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


def deviation_within_bound(estimator, model, task, steps, inner_lr, leap, eta, adapt):
    got = estimator(model, task, steps, inner_lr, leap, eta, adapt)
    exact = oracle.meta_gradient(model, task, steps, inner_lr, adapt=adapt, leap=leap)
    deviation = torch.cat([(exact[n] - got[n]).reshape(-1) for n in exact]).norm().item()
    bound = lazymaml.deviation_bound(
        model, task, steps, inner_lr, adapt=adapt, leap=leap, jacobian_step=eta or "single"
    )
    return deviation, bound, deviation <= bound * (1 + 1e-9) + 1e-12


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


@given(
    problem=mlp_problems(),
    steps=st.integers(2, 8),
    inner_lr=st.floats(0.01, 0.5),
    leap=st.floats(0.05, 1.0),
    eta=st.one_of(st.none(), st.floats(0.0, 1.0)),
    adapt=ADAPT,
)
def test_deviation_within_bound(problem, steps, inner_lr, leap, eta, adapt):
    model, task = problem
    deviation, bound, ok = deviation_within_bound(lazy, model, task, steps, inner_lr, leap, eta, adapt)
    assert ok, f"‖g_exact − g_lazy‖ = {deviation:.6e} exceeds the bound {bound:.6e}"


@pytest.mark.parametrize("adapt", [None, "body"])
def test_deviation_within_bound_conv_batchnorm(adapt):
    assert deviation_within_bound(lazy, conv_bn().train(), image_task(), 4, 0.2, 1.0, None, adapt)[2]


def test_bound_is_zero_at_k1_with_the_single_step():
    model, task = mlp([2, 4, 1]), regression_task()
    assert lazymaml.deviation_bound(model, task, 1, 0.3, leap=0.5) == 0.0
    assert lazymaml.deviation_bound(model, task, 1, 0.3, leap=0.5, jacobian_step="horizon") == 0.0


def test_bound_is_attained_at_k1_by_a_one_parameter_model():
    """At K = 1 with η ≠ γα, g_exact − g_lazy = (η − γα) H_0 E_Aᵀ v, so the deviation is
    |η − γα| ‖H_0 v‖ and the bound |η − γα| ‖H_0‖ ‖v‖: equal when H_0 is a scalar. The ratio is
    asserted to 1e-9 (both sides are the same float64 quantities computed two ways)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Tanh()).double()
    x = torch.linspace(-1, 1, 7, dtype=torch.float64).view(-1, 1)
    task = Task((x, torch.sin(2 * x)), (x + 0.1, torch.cos(x)), torch.nn.functional.mse_loss)
    deviation, bound, ok = deviation_within_bound(lazy, model, task, 1, 0.3, 0.5, 0.05, None)
    assert ok and deviation > 1e-4
    assert deviation / bound == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("adapt", "leap"), [(None, 1.0), ("head", 0.6), ("body", 0.8)])
def test_bound_terms_are_the_norms_a_dense_computation_gives(adapt, leap):
    """‖T_0‖, ‖E_A H_k‖ and ‖v‖ recomputed here from dense Hessians of a flat-vector model
    (tests.helpers.Flat: no project code), along an SGD trajectory written here; and the bound
    assembled from them by the bound's formula (docs/mathematics.md). Agreement to 1e-10 relative
    (float64, the same eigenproblems solved twice); a ‖I + αH‖ or an unprojected H would be off by
    O(α‖H‖)."""
    model, task = mlp([2, 4, 3, 1], "softplus"), regression_task()
    steps, alpha, eta = 3, 0.4, 0.05
    flat = Flat(model, task, adapt)
    mask = flat.mask
    phi, norms = flat.theta.clone(), []
    for k in range(steps):
        hessian = torch.autograd.functional.hessian(flat.support, phi)
        projected = mask[:, None] * hessian
        norms.append(torch.linalg.matrix_norm(projected, ord=2).item())
        if k == 0:
            t0 = torch.linalg.matrix_norm(torch.eye(len(phi), dtype=phi.dtype) - alpha * projected, ord=2)
        point = phi.clone().requires_grad_()
        (grad,) = torch.autograd.grad(flat.support(point), point)
        phi = phi - alpha * mask * grad
    teacher = (flat.theta + leap * (phi - flat.theta)).requires_grad_()
    (v,) = torch.autograd.grad(flat.query(teacher), teacher)

    terms = lazymaml.bound_terms(model, task, steps, alpha, adapt=adapt, leap=leap)
    assert terms.t0_norm == pytest.approx(t0.item(), rel=1e-10)
    assert terms.hessian_norms == pytest.approx(norms, rel=1e-10)
    assert terms.v_norm == pytest.approx(v.norm().item(), rel=1e-10)
    growth = (1 + alpha * norms[1]) * (1 + alpha * norms[2]) - 1
    want = (leap * t0.item() * growth + abs(eta - leap * alpha) * norms[0]) * v.norm().item()
    assert terms.bound(eta) == pytest.approx(want, rel=1e-10)


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


def test_hvp_equals_finite_differences_of_the_support_gradient():
    model, task = mlp([3, 6, 2], "softplus"), regression_task(inputs=3, outputs=2)
    student = Student.read(model, "head")
    g = torch.Generator().manual_seed(0)
    u = {n: torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in student.theta.items()}
    h = lazymaml.hvp(student, task, student.theta, u)

    def gradient(shift):  # ∇L_S at θ + shift·E_Aᵀu, first order only
        point = {
            n: (t + shift * u[n] if n in student.adapted else t).requires_grad_()
            for n, t in student.theta.items()
        }
        loss = task.support_loss(student.at(point, student.fresh()))
        return dict(zip(point, torch.autograd.grad(loss, list(point.values()))))

    eps = 1e-6
    plus, minus = gradient(eps), gradient(-eps)
    fd = {n: (plus[n] - minus[n]) / (2 * eps) for n in plus}
    compare(h, fd).assert_close(rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(h["0.weight"]) > 0  # the body gets its mixed second-derivative term


@pytest.mark.parametrize("adapt", [None, "head", "body"])
def test_lazy_at_k1_equals_finite_differences(adapt):
    model, task = mlp([2, 5, 5, 1], "tanh"), regression_task()
    fd = finite_differences.meta_gradient(model, task, 1, 0.3, adapt=adapt, leap=0.6)
    compare(lazy(model, task, 1, 0.3, 0.6, adapt=adapt), fd).assert_close(rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("adapt", [None, "head", "body"])
@pytest.mark.parametrize("eta", ["single", "horizon", 0.05])
def test_straight_through_graph_equals_hvp_form(steps, adapt, eta):
    model, task = conv_bn().train(), image_task()
    alpha, leap = 0.2, 0.7
    phi_t, _ = Student.read(model, adapt).teacher(task, InnerLoop(steps, alpha, leap))
    theta = dict(model.named_parameters())
    f = lazymaml.straight_through(model, task, steps, alpha, adapt=adapt, leap=leap, jacobian_step=eta)
    for n in theta:
        torch.testing.assert_close(f.tensors[n], phi_t[n], rtol=0, atol=1e-15)  # value: the teacher
    graph = dict(zip(theta, torch.autograd.grad(task.query_loss(f), list(theta.values()))))
    lazy_g = lazymaml.meta_gradient(model, task, steps, alpha, adapt=adapt, leap=leap, jacobian_step=eta)
    compare(graph, lazy_g).assert_close(RTOL, ATOL)


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
