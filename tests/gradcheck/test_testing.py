"""gradcheck.testing.assert_meta_gradient: the user's example MAML passes, its broken variant fails
with the diagnosis in the message, side effects are reported unless allowed."""

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from torch.func import functional_call

from gradcheck import Validation
from gradcheck.strategies import RATES, adapts, leaps, problems, rate_kinds
from gradcheck.testing import Problem, assert_meta_gradient
from tests.helpers import adapted_names, conv_bn, image_task, mlp, regression_task

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "test_my_maml.py"


def _example():
    spec = importlib.util.spec_from_file_location("user_example_test_my_maml", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


user = _example()


@settings(max_examples=8)
@given(problem=problems())
def test_a_correct_implementation_passes(problem):
    result = assert_meta_gradient(user.my_maml, problem)
    assert isinstance(result, Validation) and result.ok()


@settings(max_examples=8)
@given(problem=problems())
def test_forgetting_create_graph_fails_and_is_diagnosed(problem):
    with pytest.raises(AssertionError, match="candidate disagrees") as failure:
        assert_meta_gradient(user.first_order_maml, problem)
    assert "diagnosis: first_order" in str(failure.value)
    assert "parameter  shape" in str(failure.value)  # the per-parameter table travels with it


def test_a_sum_over_the_meta_batch_is_diagnosed_as_scaled():
    def summed(model, tasks, steps, inner_lr):
        grads = [user.my_maml(model, t, steps, inner_lr) for t in tasks]
        return {n: sum(g[n] for g in grads) for n in grads[0]}

    problem = Problem(mlp([2, 4, 1]), [regression_task(s) for s in range(3)], 2, 0.1)
    assert_meta_gradient(user.my_meta_batch_maml, problem, meta_batch=True)
    with pytest.raises(AssertionError, match="diagnosis: scaled"):
        assert_meta_gradient(summed, problem, meta_batch=True)


def _touches_running_statistics(model, task, steps, inner_lr):
    model(task.support[0])  # a forward in train mode: BatchNorm updates its running statistics
    return user.my_maml(model, task, steps, inner_lr)


def test_side_effects_are_reported_unless_allowed():
    model = conv_bn()
    before = model[1].running_mean.clone()
    problem = Problem(model, [image_task(0), image_task(1)], 2, 0.2)
    with pytest.raises(AssertionError, match=r"side effect on the model: .*running_mean"):
        assert_meta_gradient(_touches_running_statistics, problem)
    assert torch.equal(model[1].running_mean, before)  # and undone
    assert assert_meta_gradient(_touches_running_statistics, problem, allow_side_effects=True).gradient_ok()


def test_adapt_and_leap_reach_the_candidate_only_when_set():
    seen = []

    def recording(model, task, steps, inner_lr, **options):
        seen.append(options)
        return user.my_maml(model, task, steps, inner_lr, **options)

    model, task = mlp([2, 3, 1]), regression_task()
    assert_meta_gradient(recording, Problem(model, task, 2, 0.1))
    assert_meta_gradient(recording, Problem(model, task, 2, 0.1, adapt="head", leap=0.5))
    assert seen == [{}, {"adapt": "head", "leap": 0.5}]


def test_rtol_is_the_callers():
    def doubled(model, task, steps, inner_lr):
        return {n: 1.5 * g for n, g in user.my_maml(model, task, steps, inner_lr).items()}

    problem = Problem(mlp([2, 3, 1]), regression_task(), 2, 0.1)
    with pytest.raises(AssertionError, match=r"rtol=1e-09"):
        assert_meta_gradient(doubled, problem)
    assert_meta_gradient(doubled, problem, rtol=0.6)


def test_arguments_are_checked():
    model, task = mlp([2, 3, 1]), regression_task()
    with pytest.raises(TypeError, match=r"problem must be a gradcheck\.testing\.Problem"):
        assert_meta_gradient(user.my_maml, (model, task))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        Problem("model", task, 2, 0.1)
    with pytest.raises(ValueError, match="at least one task"):
        Problem(model, [], 2, 0.1)
    assert repr(Problem(model, [task, task], 2, 0.1, label="mlp")) == (
        "Problem(mlp, 2 tasks, steps=2, inner_lr=0.1, adapt=None, leap=1.0)"
    )


# --- learned inner rates ---------------------------------------------------------------------------


def rated_user_maml(model, task, steps, inner_lr, *, adapt=None, leap=1.0, per_step_lr=False, detach=False):
    """A user's Meta-SGD / LSLR / learned-α MAML (plain autograd): ``inner_lr`` a tensor for every
    adapted parameter or {name: tensor}; returns θ's and the rates' meta-gradients under the
    oracle's keys. ``detach``: the rates used as constants (the bug)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rates = {"inner_lr": inner_lr} if isinstance(inner_lr, torch.Tensor) else dict(inner_lr)
    adapted = adapted_names(model, adapt)

    def rate(n, k):
        r = rates.get("inner_lr", rates.get(n))
        r = r.detach() if detach else r
        return r[k] if per_step_lr else r

    def loss(tensors, batch):
        return task.loss(functional_call(model, {**tensors, **buffers}, (batch[0],)), batch[1])

    phi = dict(params)
    for k in range(steps):
        grads = torch.autograd.grad(loss(phi, task.support), [phi[n] for n in adapted], create_graph=True)
        phi.update({n: phi[n] - rate(n, k) * g for n, g in zip(adapted, grads)})
    teacher = {n: p + leap * (phi[n] - p) for n, p in params.items()}
    keys = {k if k == "inner_lr" else f"inner_lr.{k}": t for k, t in rates.items()}
    wrt = {**params, **keys}
    grads = torch.autograd.grad(loss(teacher, task.query), list(wrt.values()), allow_unused=True)
    return {n: torch.zeros_like(wrt[n]) if g is None else g for n, g in zip(wrt, grads)}


@settings(max_examples=8)
@given(problem=problems(kinds=("mlp", "conv_bn"), rates=rate_kinds(RATES[1:]), adapt=adapts(), leap=leaps()))
def test_a_correct_rated_implementation_passes_on_drawn_learned_rates(problem):
    result = assert_meta_gradient(rated_user_maml, problem)
    assert any(r.name.startswith("inner_lr") and r.reference_norm > 0 for r in result.overall.rows)


@settings(max_examples=4)
@given(problem=problems(kinds=("mlp",), rates=rate_kinds(RATES[1:])))
def test_rates_used_as_constants_fail_with_rates_detached(problem):
    detached = functools.partial(rated_user_maml, detach=True)
    with pytest.raises(AssertionError, match="diagnosis: rates_detached"):
        assert_meta_gradient(detached, problem)


def test_a_problem_passes_its_rate_settings_to_the_candidate_and_to_validate():
    model = mlp([2, 4, 1])
    rates = {
        n: torch.full((3, *p.shape), 0.1, dtype=p.dtype, requires_grad=True)
        for n, p in model.named_parameters()
    }
    problem = Problem(model, [regression_task(0)], 2, rates, per_step_lr=True)
    assert problem.options == {"per_step_lr": True}
    assert "learned rates {0.weight: (3, 4, 2)" in repr(problem) and "per_step_lr=True" in repr(problem)
    seen = {}

    def spy(model, task, steps, inner_lr, **options):
        seen.update(options, inner_lr=inner_lr)
        return rated_user_maml(model, task, steps, inner_lr, **options)

    assert_meta_gradient(spy, problem)
    assert seen["per_step_lr"] is True and seen["inner_lr"] is rates
