"""lazymaml.bound: the proven bound on ‖g_exact − g_lazy‖, against the exact oracle, against
its own terms recomputed densely here, and where it is tight.

Tolerances: the deviation is compared with the bound with a relative slack of 1e-9 (and 1e-12
absolute) for the rounding in the norms; the terms recomputed here, and bounds that perform the
same float64 operations, agree to rtol 1e-10 (the same eigenproblems solved twice, measured
~1e-14).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lazymaml
from gradcheck import Task, oracle
from tests.helpers import F64, Flat, conv_bn, image_task, mlp, mlp_problems, regression_task

ADAPT = st.sampled_from([None, "head", "body"])


def lazy(model, task, steps, inner_lr, leap=1.0, eta=None, adapt=None):
    return lazymaml.meta_gradient(
        model, task, steps, inner_lr, adapt=adapt, leap=leap, jacobian_step="single" if eta is None else eta
    )


def deviation_within_bound(estimator, model, task, steps, inner_lr, leap, eta, adapt):
    got = estimator(model, task, steps, inner_lr, leap, eta, adapt)
    exact = oracle.meta_gradient(model, task, steps, inner_lr, adapt=adapt, leap=leap)
    deviation = torch.cat([(exact[n] - got[n]).reshape(-1) for n in exact]).norm().item()
    bound = lazymaml.deviation_bound(
        model, task, steps, inner_lr, adapt=adapt, leap=leap, jacobian_step="single" if eta is None else eta
    )
    return deviation, bound, deviation <= bound * (1 + 1e-9) + 1e-12


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
    assembled from them by the bound's formula. Agreement to 1e-10 relative (float64, the same
    eigenproblems solved twice); a ‖I + αH‖ or an unprojected H would be off by O(α‖H‖)."""
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


def test_bound_at_k0_is_zero():
    model, task = mlp([2, 4, 1]), regression_task()
    assert lazymaml.deviation_bound(model, task, 0, 0.3, jacobian_step=0.7) == 0.0
    assert lazymaml.bound_terms(model, task, 0, 0.3).hessian_norms == ()


def test_bound_of_several_tasks_is_the_mean_of_their_bounds():
    model, tasks = mlp([2, 4, 1], "softplus"), [regression_task(seed) for seed in range(3)]
    each = [lazymaml.deviation_bound(model, t, 3, 0.2, jacobian_step=0.1) for t in tasks]
    assert len(set(each)) == 3 and min(each) > 0
    assert lazymaml.deviation_bound(model, tasks, 3, 0.2, jacobian_step=0.1) == sum(each) / 3


def test_horizon_step_is_gamma_k_alpha():
    terms = lazymaml.bound_terms(mlp([2, 4, 1]), regression_task(), 3, 0.2, leap=0.5)
    assert terms.bound("horizon") == terms.bound(0.5 * 3 * 0.2) > terms.bound("single")


def test_a_float32_model_is_bounded_in_float64():
    """The model and its data are cast to float64 exactly, so the bound is that of the float64 copy."""
    model, task = mlp([2, 4, 1], dtype=torch.float32), regression_task(dtype=torch.float32)
    got = lazymaml.deviation_bound(model, task, 3, 0.2)
    assert got == lazymaml.deviation_bound(mlp([2, 4, 1], dtype=torch.float32).double(), task.to(F64), 3, 0.2)
    closure = Task.from_closures(task.support_loss, task.query_loss)
    with pytest.raises(ValueError, match=r"the bound's dense Hessians need torch.float64"):
        lazymaml.deviation_bound(model, closure, 3, 0.2)


def test_bound_refusals():
    model, task = mlp([2, 4, 1]), regression_task()
    with pytest.raises(
        ValueError, match=r"the deviation bound differentiates exactly through inner_optimizer in \['sgd'\]"
    ):
        lazymaml.deviation_bound(model, task, 2, 0.1, inner_optimizer="adam")
    with pytest.raises(ValueError, match=r"the bound needs dense 17×17 Hessians; limit max_parameters=16"):
        lazymaml.bound_terms(model, task, 2, 0.1, max_parameters=16)
    with pytest.raises(ValueError, match="jacobian_step must be"):
        lazymaml.deviation_bound(model, task, 2, 0.1, jacobian_step="double")


@pytest.mark.parametrize("adapt", [None, "head"])
def test_horizon_terms_are_bound_terms_of_each_k(adapt):
    """One trajectory of max K steps gives, for every K, exactly (==, not approximately) the terms
    bound_terms computes for that K alone: the same float64 operations on the same points."""
    model, task = mlp([2, 4, 3, 1], "softplus"), regression_task()
    shared = lazymaml.bound.horizon_terms(model, task, [0, 1, 3, 5], 0.3, adapt=adapt, leap=0.7)
    assert list(shared) == [0, 1, 3, 5]
    for k, terms in shared.items():
        assert terms == lazymaml.bound_terms(model, task, k, 0.3, adapt=adapt, leap=0.7)
    assert shared[3].hessian_norms == shared[5].hessian_norms[:3]
    assert shared[3].v_norm != shared[5].v_norm  # each K's own teacher


def test_horizon_terms_share_the_hessians_of_a_batchnorm_net():
    """Train-mode BatchNorm: the running statistics the student updates do not leak between K."""
    model, task = conv_bn().train(), image_task()
    sizes = []
    shared = lazymaml.bound.horizon_terms(model, task, [1, 3], 0.2, on_hessian=sizes.append)
    n = lazymaml.bound.parameter_count(model)
    assert sizes == [n] * 3  # one n × n Hessian per step of the longest K, none repeated
    for k in (1, 3):
        assert shared[k] == lazymaml.bound_terms(model, task, k, 0.2)
    assert lazymaml.bound.horizon_terms(model, task, [], 0.2) == {}
