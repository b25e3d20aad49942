"""gradcheck.testing.assert_meta_gradient: the user's example MAML passes, its broken variant fails
with the diagnosis in the message, side effects are reported unless allowed."""

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

from gradcheck import Validation
from gradcheck.strategies import problems
from gradcheck.testing import Problem, assert_meta_gradient
from tests.helpers import conv_bn, image_task, mlp, regression_task

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
