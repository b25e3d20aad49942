"""gradcheck.strategies: drawn problems are float64, small, valid for the oracle, deterministic for
a given draw, built without the global RNG; every argument narrows what is drawn."""

import subprocess
import sys

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from gradcheck import Task, finite_differences, oracle
from gradcheck.strategies import (
    PROFILE,
    RATES,
    adapts,
    classification_tasks,
    conv_nets,
    leaps,
    mlps,
    problems,
    rate_kinds,
    regression_tasks,
)
from gradcheck.testing import Problem
from tests.helpers import adapted_names


def _tensors(problem):
    """Every tensor of a problem: the model's state and each task's data."""
    out = list(problem.model.state_dict().values())
    for t in problem.tasks:
        out += [*t.support, *t.query]
    return out


def _draws(strategy, n=6):
    """The first ``n`` values hypothesis draws from ``strategy``, derandomized (the same each run)."""
    out = []

    @settings(derandomize=True, database=None, max_examples=n, phases=[Phase.generate])
    @given(strategy)
    def collect(value):
        out.append(value)

    collect()
    return out


@given(problem=problems())
def test_problems_are_float64_small_and_plain_maml(problem):
    assert isinstance(problem, Problem) and isinstance(problem.tasks, tuple)
    assert all(t.dtype == torch.float64 for t in _tensors(problem) if t.is_floating_point())
    assert sum(p.numel() for p in problem.model.parameters()) <= 200
    assert 1 <= len(problem.tasks) <= 3 and 1 <= problem.steps <= 3 and 0.01 <= problem.inner_lr <= 0.5
    assert problem.adapt is None and problem.leap == 1.0 and problem.options == {}
    Task.stack(list(problem.tasks))  # the tasks of a meta-batch have equal shapes


@given(
    problem=problems(
        kinds=("mlp",),
        steps=st.integers(2, 4),
        meta_batch=st.integers(2, 3),
        inner_lr=0.1,
        shots=5,
        queries=3,
    )
)
def test_arguments_narrow_the_draw(problem):
    assert all(len(t.support[0]) == 5 and len(t.query[0]) == 3 for t in problem.tasks)
    assert isinstance(problem.model[0], nn.Linear) and problem.label.startswith("mlp")
    assert 2 <= problem.steps <= 4 and 2 <= len(problem.tasks) <= 3 and problem.inner_lr == 0.1
    assert sum(isinstance(m, nn.Linear) for m in problem.model) >= 2  # a hidden layer: head ≠ body


@given(problem=problems(kinds=("conv", "conv_bn")))
def test_conv_nets_match_their_tasks_and_batch_norm_is_in_train_mode(problem):
    norms = [m for m in problem.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == problem.label.startswith("conv_bn") and all(m.training for m in norms)
    (x, y), ways = problem.tasks[0].support, problem.model[-1].out_features
    assert x.dim() == 4 and y.dtype == torch.long and set(y.tolist()) == set(range(ways))
    assert problem.model(x).shape == (len(y), ways)


@settings(max_examples=6)
@given(problem=problems(adapt=adapts(), leap=leaps()))
def test_the_oracle_agrees_with_finite_differences_on_drawn_problems(problem):
    options = dict(adapt=problem.adapt, leap=problem.leap)
    exact = oracle.meta_gradient(problem.model, problem.tasks, problem.steps, problem.inner_lr, **options)
    finite_differences.check(
        exact, problem.model, problem.tasks, problem.steps, problem.inner_lr, directions=4, **options
    ).assert_close()


def test_a_draw_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second = _draws(problems()), _draws(problems())
    assert torch.equal(state, torch.random.get_rng_state())
    assert len(first) == 6 and [repr(p) for p in first] == [repr(p) for p in second]
    for a, b in zip(first, second):
        assert all(torch.equal(s, t) for s, t in zip(_tensors(a), _tensors(b), strict=True))


def test_the_parts_are_strategies_of_their_own():
    model = _draws(mlps(3, 2, hidden=st.just([4])), 1)[0]
    assert [m.in_features for m in model if isinstance(m, nn.Linear)] == [3, 4]
    task = _draws(regression_tasks(3, 2, shots=5, queries=4), 1)[0]
    assert task.support[0].shape == (5, 3) and task.query[1].shape == (4, 2)
    net = _draws(conv_nets(ways=4, image_size=5, in_channels=2, batch_norm=True), 1)[0]
    images = _draws(classification_tasks(ways=4, image_size=5, in_channels=2, shots=3), 1)[0]
    assert images.support[0].shape == (12, 2, 5, 5)
    assert net(images.support[0]).shape == (12, 4)


def test_float32_on_request():
    problem = _draws(problems(dtype=torch.float32), 1)[0]
    assert all(t.dtype == torch.float32 for t in _tensors(problem) if t.is_floating_point())


@pytest.mark.parametrize("kinds", [(), ("mlp", "resnet")])
def test_unknown_kinds_are_refused(kinds):
    with pytest.raises(ValueError, match="kinds must be a non-empty selection"):
        _draws(problems(kinds=kinds), 1)


def test_the_profile_is_registered():
    profile = settings.get_profile(PROFILE)
    assert profile.deadline is None and profile.max_examples == 20


def test_import_gradcheck_does_not_import_hypothesis():
    code = "import sys, gradcheck, gradcheck.testing; assert 'hypothesis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@given(problem=problems(rates=rate_kinds(), adapt=adapts()))
def test_learned_rates_are_drawn_on_request_with_the_shapes_the_oracle_takes(problem):
    lr, adapted = problem.inner_lr, adapted_names(problem.model, problem.adapt)
    if isinstance(lr, float):
        assert not problem.per_step_lr
        return
    tensors = [lr] if isinstance(lr, torch.Tensor) else list(lr.values())
    assert all(t.requires_grad and t.dtype == torch.float64 and bool((t > 0).all()) for t in tensors)
    if isinstance(lr, torch.Tensor):
        assert lr.shape == () and not problem.per_step_lr
    else:
        assert sorted(lr) == sorted(adapted)
        params = dict(problem.model.named_parameters())
        lead = (problem.steps + 1,) if problem.per_step_lr else ()
        assert all(t.shape == lead + params[n].shape for n, t in lr.items())


def test_every_rate_kind_is_drawn_and_none_is_the_default():
    assert all(isinstance(p.inner_lr, float) for p in _draws(problems(), 4))
    kinds = set()
    for p in _draws(problems(rates=rate_kinds()), 30):
        lr = p.inner_lr
        kinds.add(
            "none"
            if isinstance(lr, float)
            else "scalar"
            if isinstance(lr, torch.Tensor)
            else "per_step"
            if p.per_step_lr
            else "per_entry"
        )
    assert kinds == set(RATES)
    with pytest.raises(ValueError, match="rate kinds must be"):
        rate_kinds(("none", "adam"))


@settings(max_examples=4)
@given(problem=problems(rates=rate_kinds(RATES[1:]), adapt=adapts()))
def test_the_oracle_agrees_with_finite_differences_on_drawn_learned_rates(problem):
    options = dict(adapt=problem.adapt, per_step_lr=problem.per_step_lr)
    exact = oracle.meta_gradient(problem.model, problem.tasks, problem.steps, problem.inner_lr, **options)
    finite_differences.check(
        exact, problem.model, problem.tasks, problem.steps, problem.inner_lr, directions=4, **options
    ).assert_close()
