"""Each estimator against its own definition, written independently in the tests (float64)."""

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lazymaml
import lazymaml.report
from gradcheck import Task, compare, finite_differences, oracle, validate
from gradcheck.settings import InnerLoop
from gradcheck.student import apply_leap
from lazymaml.estimators import (
    REGISTRY,
    ConvergenceWarning,
    Estimator,
    _conjugate_gradient,
    as_function,
    first_order,
    get,
    imaml,
    register,
    reptile,
    run,
    sqrt_interval,
    stored_point,
    truncated,
)
from tests.helpers import (
    Flat,
    conv_bn,
    image_task,
    mlp,
    mlp_problems,
    reference_meta_gradient,
    regression_task,
)

RTOL, ATOL = 1e-10, 1e-13


@given(
    problem=mlp_problems(),
    steps=st.integers(0, 6),
    leap=st.floats(0.1, 1.0),
    adapt=st.sampled_from([None, "head"]),
)
def test_first_order_is_the_query_gradient_at_the_teacher(problem, steps, leap, adapt):
    model, task = problem
    want = reference_meta_gradient(model, task, steps, 0.2, adapt=adapt, leap=leap, first_order=True)
    compare(first_order(model, task, steps, 0.2, leap=leap, adapt=adapt), want).assert_close(RTOL, ATOL)


@pytest.mark.parametrize("adapt", [None, "head"])
def test_reptile_is_the_normalised_displacement(adapt):
    model, task = conv_bn().train(), image_task()
    student = copy.deepcopy(model)
    params = [p for n, p in student.named_parameters() if adapt is None or n.startswith("4.")]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(4):
        optimizer.zero_grad()
        task.support_loss(student).backward()
        optimizer.step()
    want = {n: (p - q) / (4 * 0.1) for (n, p), q in zip(model.named_parameters(), student.parameters())}
    compare(reptile(model, task, 4, 0.1, adapt=adapt), want).assert_close(1e-9, 1e-12)
    assert all(torch.count_nonzero(t) == 0 for t in reptile(model, task, 0, 0.1).values())


@given(
    problem=mlp_problems(),
    steps=st.integers(1, 6),
    leap=st.floats(0.1, 1.0),
    adapt=st.sampled_from([None, "head"]),
)
def test_truncated_through_all_steps_is_the_oracle(problem, steps, leap, adapt):
    model, task = problem
    want = oracle.meta_gradient(model, task, steps, 0.2, adapt=adapt, leap=leap)
    compare(truncated(model, task, steps, 0.2, leap=leap, adapt=adapt), want).assert_close(RTOL, ATOL)


@pytest.mark.parametrize("horizon", [0, 1, 2, 4])
def test_truncated_horizon_matches_definition(horizon):
    model, task = mlp([2, 5, 5, 1], "softplus"), regression_task()
    want = reference_meta_gradient(model, task, 4, 0.2, leap=0.6, horizon=horizon)
    compare(truncated(model, task, 4, 0.2, leap=0.6, horizon=horizon), want).assert_close(RTOL, ATOL)
    if horizon == 0:
        compare(
            truncated(model, task, 4, 0.2, leap=0.6, horizon=0), first_order(model, task, 4, 0.2, leap=0.6)
        ).assert_close(RTOL, ATOL)


def test_truncated_conv_batchnorm_is_the_oracle():
    model, task = conv_bn().train(), image_task()
    compare(
        truncated(model, task, 3, 0.2, adapt="body"), oracle.meta_gradient(model, task, 3, 0.2, adapt="body")
    ).assert_close(RTOL, ATOL)


@pytest.mark.parametrize("horizon", [-1, 5, 1.5])
def test_truncated_refuses_bad_horizon(horizon):
    with pytest.raises(ValueError, match=r"horizon must be an integer in \[0, steps=4\]"):
        truncated(mlp([2, 3, 1]), regression_task(), 4, 0.1, horizon=horizon)


def _imaml_dense(model, task, steps, alpha, lam, leap, adapt):
    """The implicit meta-gradient by a dense solve, from a proximal SGD student written here."""
    flat = Flat(model, task, adapt)
    theta, mask = flat.theta, flat.mask
    phi = theta.clone()
    for _ in range(steps):
        phi = phi.detach().requires_grad_()
        (grad,) = torch.autograd.grad(flat.support(phi), phi)
        phi = phi - alpha * mask * (grad + lam * (phi - theta))
    phi = phi.detach()
    hessian = torch.autograd.functional.hessian(flat.support, phi)
    phi_t = (theta + leap * (phi - theta)).requires_grad_()
    (v,) = torch.autograd.grad(flat.query(phi_t), phi_t)
    a, b = mask.bool(), ~mask.bool()
    g = v.clone()
    g[a] = torch.linalg.solve(torch.eye(int(a.sum()), dtype=v.dtype) + hessian[a][:, a] / lam, v[a])
    g[b] = v[b] - hessian[b][:, a] @ g[a] / lam
    return flat.named((1 - leap) * v + leap * g)


@pytest.mark.parametrize(("adapt", "leap", "lam"), [(None, 1.0, 2.0), ("head", 1.0, 0.5), ("body", 0.7, 1.0)])
def test_imaml_matches_dense_linear_solve(adapt, leap, lam):
    model, task = mlp([2, 6, 6, 1], "tanh"), regression_task()
    want = _imaml_dense(model, task, 6, 0.1, lam, leap, adapt)
    got = imaml(model, task, 6, 0.1, leap=leap, adapt=adapt, lam=lam, cg_iterations=200, cg_tol=1e-13)
    compare(got, want).assert_close(rtol=1e-9, atol=1e-12)


def test_imaml_warns_when_cg_does_not_converge():
    model, task = mlp([2, 6, 6, 1], "tanh"), regression_task()
    with pytest.warns(
        ConvergenceWarning, match="conjugate gradient stopped at relative residual .* after 1 iterations"
    ):
        imaml(model, task, 3, 0.1, lam=2.0, cg_iterations=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imaml(model, task, 3, 0.1, lam=2.0, cg_iterations=200)


def test_conjugate_gradient_converges_in_n_steps_on_an_ill_conditioned_system():
    """CG solves an n×n SPD system in at most n iterations (exact arithmetic); steepest descent
    needs ~κ·log(1/tol) of them. With eigenvalues spread over six decades (κ = 1e6), n = 12 and a
    budget of 3n, only genuine conjugate directions reach a 1e-10 relative residual."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, 6, 12, dtype=torch.float64)) @ q.T
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x, residual, used = _conjugate_gradient(lambda v: a @ v, b, iterations=36, tol=1e-10)
    assert residual <= 1e-10 and used <= 36
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=0)


def test_imaml_refuses_an_indefinite_system():
    model = mlp([2, 6, 1], "tanh")
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    concave = Task.from_closures(lambda f: -f(x).pow(2).mean(), lambda f: f(x).pow(2).mean())
    with pytest.raises(ValueError, match=r"not positive definite .* increase lam"):
        imaml(model, concave, 0, 0.1, lam=1e-3, cg_iterations=50)


@pytest.mark.parametrize("lam", [0.0, -1.0, float("inf")])
def test_imaml_refuses_bad_lambda(lam):
    with pytest.raises(ValueError, match="lam"):
        imaml(mlp([2, 3, 1]), regression_task(), 2, 0.1, lam=lam)


def test_lazy_horizon_is_the_lazy_gradient_with_eta_gamma_k_alpha():
    model, task = mlp([2, 5, 1], "softplus"), regression_task()
    want = lazymaml.meta_gradient(model, task, 5, 0.1, leap=0.5, jacobian_step=0.5 * 5 * 0.1)
    compare(as_function("lazy_horizon")(model, task, 5, 0.1, leap=0.5), want).assert_close(0, 0)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_estimator_averages_a_meta_batch_however_it_is_given(name):
    """One task, a list and Task.stack(...) are the same call: the list's gradient is the mean of
    the single-task gradients (to rounding), for every parameter and in named_parameters() order."""
    model, tasks = conv_bn().train(), [image_task(0), image_task(1)]
    options = dict(leap=0.8, adapt="head")
    single = [as_function(name)(model, t, 2, 0.1, **options) for t in tasks]
    assert list(single[0]) == [n for n, _ in model.named_parameters()]
    mean = {n: (single[0][n] + single[1][n]) / 2 for n in single[0]}
    compare(as_function(name)(model, tasks, 2, 0.1, **options), mean).assert_close(1e-12, 1e-15)
    compare(as_function(name)(model, Task.stack(tasks), 2, 0.1, **options), mean).assert_close(1e-12, 1e-15)
    assert compare(single[0], single[1]).overall.rel_error > 1e-3  # the two tasks do differ


def _half_first_order(objective, theta, untrained):
    """A toy estimator, written once: half the first-order MAML gradient."""
    phi, losses = objective.descend(theta, untrained, objective.loop.steps)
    v, loss = objective.query_gradient(apply_leap(theta, phi, objective.loop.leap), untrained)
    return {n: 0.5 * g for n, g in v.items()}, loss, losses


@pytest.fixture
def toy():
    entry = register(Estimator("toy_half_first_order", _half_first_order, "half of first-order MAML"))
    yield entry
    del REGISTRY[entry.name]


def test_a_registered_estimator_runs_everywhere_an_estimator_is_named(toy):
    """One entry, added in one place: the registry's sequential mean, its calling-convention
    function, MetaLearner sequential and batched, and the report — each against half of the
    first-order gradient computed by the flat-vector unroll of tests.helpers."""
    model, tasks = mlp([2, 5, 1]), [regression_task(s) for s in range(3)]
    first = [reference_meta_gradient(model, t, 3, 0.1, leap=0.8, first_order=True) for t in tasks]
    want = {n: sum(0.5 * g[n] for g in first) / len(first) for n in first[0]}
    compare(run(toy.name, model, tasks, InnerLoop(3, 0.1, 0.8)), want).assert_close(RTOL, ATOL)
    compare(as_function(toy.name)(model, tasks, 3, 0.1, leap=0.8), want).assert_close(RTOL, ATOL)
    for batched in (True, False):
        learner_model = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", lazymaml.SequentialFallback)
            lazymaml.MetaLearner(
                learner_model, 3, 0.1, estimator=toy.name, leap=0.8, batched=batched
            ).meta_backward(tasks)
        compare({n: p.grad for n, p in learner_model.named_parameters()}, want).assert_close(RTOL, ATOL)
    rows = lazymaml.report.run(ks=[1, 2], names=[toy.name], problem_names=["sinusoid-mlp"], progress=False)
    mine = [r for r in rows if r.estimator == toy.name]
    assert [r.steps for r in mine] == [1, 2] and all(0 < r.rel_error < math.inf for r in mine)


def test_a_registered_estimator_is_a_validation_reference(toy):
    """The same entry as the truth a candidate is checked against: a correct port (written here,
    on the flat-vector unroll) passes, and full first-order MAML is named as twice it."""

    def port(model, task_or_tasks, steps, inner_lr):
        grads = [reference_meta_gradient(model, t, steps, inner_lr, first_order=True) for t in task_or_tasks]
        return {n: sum(0.5 * g[n] for g in grads) / len(grads) for n in grads[0]}

    model, tasks = mlp([2, 5, 1]), [regression_task(s) for s in range(3)]
    reference = as_function(toy.name)
    assert validate(port, model, tasks, 3, 0.1, meta_batch=True, reference=reference).gradient_ok()
    wrong = validate(first_order, model, tasks, 3, 0.1, meta_batch=True, reference=reference)
    assert not wrong.gradient_ok()
    assert wrong.diagnosis.label == "scaled" and wrong.diagnosis.scale == pytest.approx(2.0)
    assert toy.name in str(wrong) and "the oracle" not in str(wrong)


def test_the_registry_refuses_a_taken_name_and_names_the_known_ones():
    with pytest.raises(ValueError, match="registered already"):
        register(Estimator("lazy", _half_first_order, "another lazy"))
    with pytest.raises(ValueError, match=r"unknown estimator 'nope'; registered: \['first_order'"):
        get("nope")
    assert get(REGISTRY["lazy"]) is REGISTRY["lazy"]


@pytest.mark.parametrize(
    ("name", "optimizer", "pattern"),
    [
        (
            "truncated",
            "adam",
            r"estimator 'truncated' differentiates exactly through inner_optimizer in \['sgd'\]",
        ),
        ("maml", lambda p: torch.optim.SGD(p, lr=0.1), "estimator 'maml' differentiates exactly"),
    ],
)
def test_an_entry_refuses_the_optimizers_it_cannot_differentiate(name, optimizer, pattern):
    with pytest.raises(ValueError, match=pattern):
        run(name, mlp([2, 3, 1]), regression_task(), InnerLoop(2, 0.1, inner_optimizer=optimizer))


def test_exact_maml_with_an_adam_student_is_the_oracle():
    """The registry's unroll through the pure Adam update against higher with its own
    differentiable Adam (they share only gradcheck.optim.adam_update, itself pinned against
    torch.optim.Adam in tests/gradcheck/test_optim.py)."""
    model, task = mlp([2, 5, 1]), regression_task()
    got = as_function("maml")(model, task, 4, 0.05, inner_optimizer="adam", leap=0.7)
    want = oracle.meta_gradient(model, task, 4, 0.05, inner_optimizer="adam", leap=0.7)
    compare(got, want).assert_close(RTOL, ATOL)


# --- the stored-point product (the brake): maml_hvp, maml_hvp_sqrt, truncated_hvp -------------


def _learn(model, tasks, steps, inner_lr, batched, **options):
    """p.grad after one meta_backward on a copy of ``model``."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lazymaml.SequentialFallback)  # batched=True must batch
        lazymaml.MetaLearner(model, steps, inner_lr, batched=batched, **options).meta_backward(tasks)
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@given(
    problem=mlp_problems(),
    steps=st.integers(0, 7),
    inner_lr=st.floats(0.01, 0.3),
    leap=st.floats(0.1, 1.0),
    adapt=st.sampled_from([None, "head", "body"]),
    name=st.sampled_from(["maml_hvp", "maml_hvp_sqrt"]),
)
def test_stored_point_product_is_the_oracle(problem, steps, inner_lr, leap, adapt, name):
    model, task = problem
    want = oracle.meta_gradient(model, task, steps, inner_lr, adapt=adapt, leap=leap)
    got = as_function(name)(model, task, steps, inner_lr, leap=leap, adapt=adapt)
    compare(got, want).assert_close(RTOL, ATOL)


@pytest.mark.parametrize("every", [1, 2, 3, 4, 7, 9, sqrt_interval])
@pytest.mark.parametrize(("adapt", "leap"), [(None, 1.0), ("head", 0.6), ("body", 0.8)])
def test_every_checkpoint_interval_is_the_oracle(every, adapt, leap):
    model, task = mlp([2, 5, 5, 1], "softplus", seed=3), regression_task(4)
    want = oracle.meta_gradient(model, task, 7, 0.15, adapt=adapt, leap=leap)
    got = run(stored_point(every), model, task, InnerLoop(7, 0.15, leap, adapt=adapt))
    compare(got, want).assert_close(RTOL, ATOL)


def test_stored_point_product_through_conv_batchnorm_is_the_oracle():
    model, task = conv_bn().train(), image_task()
    for name in ("maml_hvp", "maml_hvp_sqrt"):
        got = as_function(name)(model, task, 4, 0.2, adapt="body", leap=0.7)
        compare(got, oracle.meta_gradient(model, task, 4, 0.2, adapt="body", leap=0.7)).assert_close(
            RTOL, ATOL
        )


@pytest.mark.parametrize(
    ("steps", "want"), [(1, 1), (2, 2), (4, 2), (5, 3), (9, 3), (10, 4), (16, 4), (17, 5)]
)
def test_sqrt_interval_is_the_ceiling_of_the_root(steps, want):
    assert sqrt_interval(steps) == want


@pytest.mark.parametrize("horizon", [0, 1, 2, 4])
def test_truncated_hvp_is_the_truncated_definition(horizon):
    model, task = mlp([2, 5, 5, 1], "softplus"), regression_task()
    want = reference_meta_gradient(model, task, 4, 0.2, leap=0.6, adapt="head", horizon=horizon)
    got = as_function("truncated_hvp")(model, task, 4, 0.2, leap=0.6, adapt="head", horizon=horizon)
    compare(got, want).assert_close(RTOL, ATOL)
    compare(got, truncated(model, task, 4, 0.2, leap=0.6, adapt="head", horizon=horizon)).assert_close(
        RTOL, ATOL
    )


@pytest.mark.parametrize("adapt", [None, "head", "body"])
def test_stored_point_product_at_one_step_is_lazy(adapt):
    """K = 1: [(1 − γ)I + γ T_0ᵀ] v = v − γα H_0 E_A v, the lazy gradient with η = γα."""
    model, task = mlp([2, 5, 5, 1], "softplus"), regression_task()
    want = lazymaml.meta_gradient(model, task, 1, 0.3, leap=0.4, adapt=adapt)
    compare(as_function("maml_hvp")(model, task, 1, 0.3, leap=0.4, adapt=adapt), want).assert_close(
        RTOL, ATOL
    )


def test_stored_point_product_passes_finite_differences_of_its_own_definition():
    model, task = mlp([2, 6, 6, 1], "tanh", seed=5), regression_task(7)
    g = as_function("maml_hvp_sqrt")(model, task, 6, 0.2, leap=0.7, adapt="body")
    finite_differences.check(g, model, task, 6, 0.2, leap=0.7, adapt="body", directions=6).assert_close()
    wrong = as_function("maml_hvp")(model, task, 5, 0.2, leap=0.7, adapt="body")  # one step short
    report = finite_differences.check(wrong, model, task, 6, 0.2, leap=0.7, adapt="body", directions=6)
    assert not report.ok()
    with pytest.raises(AssertionError):
        report.assert_close()


@pytest.mark.parametrize("name", ["maml_hvp", "maml_hvp_sqrt", "truncated_hvp"])
@pytest.mark.parametrize("adapt", [None, "body"])
def test_stored_point_product_batched_is_sequential(name, adapt):
    model = mlp([2, 5, 5, 1], "softplus", seed=2)
    tasks = Task.stack([regression_task(10 + i) for i in range(3)])
    options = dict(
        estimator=name, leap=0.7, adapt=adapt, **({"horizon": 2} if name == "truncated_hvp" else {})
    )
    batched = _learn(model, tasks, 5, 0.2, True, **options)
    sequential = _learn(model, tasks, 5, 0.2, False, **options)
    compare(batched, sequential).assert_close(1e-12, 1e-15)
    if name != "truncated_hvp":
        compare(
            batched, oracle.meta_gradient(model, list(tasks), 5, 0.2, leap=0.7, adapt=adapt)
        ).assert_close(RTOL, ATOL)


def test_stored_point_product_refuses_what_it_cannot_differentiate():
    with pytest.raises(ValueError, match="checkpoint_every"):
        stored_point(0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        stored_point(1.5)
    with pytest.raises(ValueError, match="adam"):
        as_function("maml_hvp")(mlp([2, 3, 1]), regression_task(), 3, 0.1, inner_optimizer="adam")


@pytest.mark.parametrize("steps", [2, 8])
def test_stored_point_product_keeps_one_steps_graph(steps):
    """The graph is one support gradient's, whatever K (the lazy estimator's), while the unroll's
    grows with K; the stored points are parameter copies, outside the graph."""
    from gradcheck.memory import SavedTensorMeter

    model, task = mlp([2, 16, 16, 1], "tanh"), regression_task()

    def peak(name):
        with SavedTensorMeter() as meter:
            as_function(name)(model, task, steps, 0.1)
        return meter.peak

    assert peak("maml_hvp") == peak("maml_hvp_sqrt") == peak("lazy") > 0
    assert peak("maml") > (steps - 1) * peak("maml_hvp") / 2


def test_stored_point_functions_follow_the_calling_convention():
    model, task = mlp([2, 5, 5, 1], "softplus", seed=4), regression_task(3)
    exact = lazymaml.estimators.maml(model, task, 4, 0.2, adapt="head", leap=0.6)
    for fn in (lazymaml.estimators.maml_hvp, lazymaml.estimators.maml_hvp_sqrt):
        compare(fn(model, task, 4, 0.2, adapt="head", leap=0.6), exact).assert_close(RTOL, ATOL)
    compare(
        lazymaml.estimators.truncated_hvp(model, task, 4, 0.2, leap=0.6, horizon=2),
        truncated(model, task, 4, 0.2, leap=0.6, horizon=2),
    ).assert_close(RTOL, ATOL)
