"""A lazy implementation validated against the lazy reference, and each lazy bug named.

The candidate is the hook implementation of ``tests/gradcheck/implementations.py`` (K graph-free
SGD steps, d = (θ − φ_K)/α, one differentiable step from θ whose inner gradient a hook on θ
replaces by g + (d − g).detach()); the reference is ``lazymaml.estimators.as_function("lazy")``
(η = γα). The net is the conv → BatchNorm → tanh → linear one of ``test_diagnose`` in float64
with 4 tasks, α = 0.3. Tolerances: validate's default, rtol = 1e-9 for float64 — the correct
implementation agrees to ~3e-16 (it computes the same quantity in another order), each planted bug
moves the gradient by 50% or more, and a hypothesis that explains a candidate to 1e-9 pins its
setting (the fitted η′ is asserted to 1e-6 relative, as test_diagnose's fits).
"""

import functools

import pytest
import torch

import lazymaml
from gradcheck import Task, compare, diagnose, validate
from gradcheck.optim import SGD, AdamW
from tests.gradcheck.implementations import hook_lazy, summed_hook_lazy
from tests.helpers import conv_bn, image_task, mlp, regression_task

LR = 0.3
LAZY = lazymaml.estimators.as_function("lazy")


def problem():
    return conv_bn().train(), [image_task(seed) for seed in range(4)]


def buggy(bug):
    return functools.partial(hook_lazy, bug=bug)


def test_the_lazy_reference_declares_the_setting_the_diagnosis_varies():
    assert LAZY.settings == ("jacobian_step",)
    assert lazymaml.estimators.as_function("lazy", jacobian_step=0.5).settings == ()  # fixed there
    assert lazymaml.estimators.as_function("maml").settings == ()


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_the_hook_implementation_passes_against_the_lazy_reference(steps):
    model, tasks = problem()
    result = validate(hook_lazy, model, tasks, steps, LR, reference=LAZY)
    assert result.ok(), str(result)
    assert result.overall.overall.rel_error < 1e-14
    assert "against the reference 'lazy'" in result.headline()
    assert "oracle" not in str(result)


def test_a_derived_gradient_over_k_alpha_stepped_by_k_alpha_is_lazy_horizon():
    model, tasks = problem()
    result = validate(
        buggy("horizon_step"), model, tasks, 5, LR, reference=lazymaml.estimators.as_function("lazy_horizon")
    )
    assert result.ok(), str(result)


# bug, K, label, settings the diagnosis must report, a phrase its detail must contain
CASES = [
    ("hook_returns_d", 1, "first_order", {"jacobian_step": 0.0}, "a hook that returns d itself"),
    ("hook_returns_d", 5, "first_order", {"jacobian_step": 0.0}, "a hook that returns d itself"),
    ("hook_returns_d", 20, "first_order", {"jacobian_step": 0.0}, "a hook that returns d itself"),
    ("attached_d", 1, "no_meta_gradient", {}, "built with θ's graph"),
    ("attached_d", 5, "no_meta_gradient", {}, "built with θ's graph"),
    ("attached_d", 20, "no_meta_gradient", {}, "built with θ's graph"),
    ("no_divide", 1, "leap", {"leap": LR, "jacobian_step": LR}, "not divided by α"),
    ("no_divide", 5, "leap", {"leap": LR, "jacobian_step": LR}, "not divided by α"),
    ("no_divide", 20, "leap", {"leap": LR, "jacobian_step": LR}, "not divided by α"),
    ("late_hooks", 5, "steps", {"steps": 1}, "your hooks change the backward, not ψ"),
    ("late_hooks", 20, "steps", {"steps": 1}, "your hooks change the backward, not ψ"),
    ("horizon_step", 5, "jacobian_step", {"jacobian_step": 5 * LR}, 'jacobian_step="horizon"'),
    ("tensor_hooks", 5, "unexplained", {}, "a hook on the inner-gradient tensors changes only the backward"),
]


@pytest.mark.parametrize(("bug", "steps", "label", "settings", "phrase"), CASES, ids=lambda v: str(v))
def test_each_lazy_bug_gets_its_label_against_the_lazy_reference(bug, steps, label, settings, phrase):
    model, tasks = problem()
    result = validate(buggy(bug), model, tasks, steps, LR, reference=LAZY)
    diagnosis = result.diagnosis
    assert not result.gradient_ok()
    assert diagnosis.label == label, str(diagnosis)
    assert phrase in diagnosis.detail
    for key, value in settings.items():
        assert diagnosis.settings[key] == pytest.approx(value, rel=1e-6)
    assert "oracle" not in str(result)  # the reference is never called the oracle
    assert "copy_initial_weights" not in diagnosis.detail


def test_summing_over_the_tasks_is_scaled_by_their_number():
    model, tasks = problem()
    result = validate(summed_hook_lazy, model, Task.stack(tasks), 5, LR, reference=LAZY, meta_batch=True)
    assert result.diagnosis.label == "scaled"
    assert result.diagnosis.scale == pytest.approx(4.0, rel=1e-6)
    assert "the sum over the 4 tasks instead of their mean" in result.diagnosis.detail


def test_at_one_step_one_step_maml_is_a_correct_lazy_gradient():
    """At K = 1, φ_1 = ψ: the lazy gradient is one-step MAML, so hooks that never fire pass."""
    model, tasks = problem()
    assert validate(buggy("late_hooks"), model, tasks, 1, LR, reference=LAZY).ok()
    assert validate(hook_lazy, model, tasks, 1, LR).ok()  # and against the exact oracle too


def test_a_reference_without_declared_settings_gets_no_lazy_hypothesis():
    model, task = mlp([2, 5, 1]), regression_task(0)
    wrong = hook_lazy(model, task, 3, LR, bug="hook_returns_d")
    plain = lambda *args, **kwargs: LAZY(*args, **kwargs)  # noqa: E731
    diagnosis = diagnose(wrong, model, task, 3, LR, reference=plain)
    assert diagnosis.label == "unexplained"
    assert diagnose(wrong, model, task, 3, LR, reference=LAZY).label == "first_order"


def test_a_reference_declaring_an_unknown_setting_is_refused():
    model, task = mlp([2, 5, 1]), regression_task(0)

    def reference(*args, **kwargs):
        return LAZY(*args, **kwargs)

    reference.settings = ("lam",)
    with pytest.raises(ValueError, match="varies only"):
        diagnose(hook_lazy(model, task, 2, LR), model, task, 2, LR, reference=reference)


def test_the_lazy_estimator_runs_the_new_inner_optimizers_as_torch_optim_does():
    """A spec is the pure update in the estimator's inner loop; a factory is the real torch.optim
    optimizer stepping copies: the same student, to rounding."""
    model, task = mlp([2, 5, 1]), regression_task(0)
    for spec in (SGD(momentum=0.9, nesterov=True, weight_decay=0.01), AdamW(weight_decay=0.1)):
        pure = lazymaml.meta_gradient(model, task, 5, 0.05, inner_optimizer=spec)
        factory = lambda p, spec=spec: spec.torch_class(p, lr=0.05, **spec.options())  # noqa: E731
        real = lazymaml.meta_gradient(model, task, 5, 0.05, inner_optimizer=factory)
        compare(pure, real).assert_close(1e-12, 0)


def test_hooks_on_the_inner_gradient_tensors_compute_one_sgd_step_plus_h_times_d():
    """Why that variant is no setting of the reference: a tensor hook rewrites the gradient
    flowing back into g (to d), never g's value, so ψ = φ_1 and the result is
    ∇L_Q(φ_1) + H(θ)·d — written out here with plain autograd (agreement to rounding, 1e-13)."""
    model, task, steps = mlp([2, 5, 1]), regression_task(0), 5
    candidate = hook_lazy(model, task, steps, LR, bug="tensor_hooks")
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}

    def at(tensors):
        return lambda x: torch.func.functional_call(model, tensors, (x,))

    phi = {n: t.detach().clone() for n, t in theta.items()}
    for _ in range(steps):
        leaves = {n: t.requires_grad_() for n, t in phi.items()}
        grads = torch.autograd.grad(task.support_loss(at(leaves)), list(leaves.values()))
        phi = {n: (t - LR * g).detach() for (n, t), g in zip(leaves.items(), grads)}
    d = {n: (t.detach() - phi[n]) / LR for n, t in theta.items()}
    g0 = torch.autograd.grad(task.support_loss(at(theta)), list(theta.values()), create_graph=True)
    phi1 = {n: (t - LR * g).detach().requires_grad_() for (n, t), g in zip(theta.items(), g0)}
    v1 = torch.autograd.grad(task.query_loss(at(phi1)), list(phi1.values()))
    hd = torch.autograd.grad(sum((g * d[n]).sum() for n, g in zip(theta, g0)), list(theta.values()))
    compare(candidate, {n: a + b for n, a, b in zip(theta, v1, hd)}).assert_close(1e-13, 0)
