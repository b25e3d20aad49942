import copy

import pytest
import torch

import lazymaml
from gradcheck import Task, compare, oracle, problems, validate
from tests.helpers import assert_same_state, conv_bn, image_task, mlp, model_state, regression_task

RTOL, ATOL = 1e-10, 1e-13


def test_meta_backward_accumulates_the_mean_into_grad():
    model, tasks = mlp([2, 5, 1]), [regression_task(s) for s in range(3)]
    existing = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = existing[n].clone()
    learner = lazymaml.LazyMAML(model, 4, 0.1, leap=0.8)
    loss = learner.meta_backward(tasks)
    grads = [lazymaml.meta_gradient(model, t, 4, 0.1, leap=0.8) for t in tasks]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, existing[n] + sum(g[n] for g in grads) / 3, rtol=RTOL, atol=ATOL)
    assert loss.shape == () and not loss.requires_grad and loss.item() > 0


def test_meta_backward_at_k1_validates_against_the_oracle():
    """LazyMAML as a user's meta-batch implementation: at K = 1 it must be exact MAML."""

    def candidate(model, tasks, steps, inner_lr):
        lazymaml.LazyMAML(model, steps, inner_lr, adapt="body").meta_backward(tasks)

    model = conv_bn().train()
    before = model_state(model)
    tasks = [image_task(s) for s in range(3)]
    validate(candidate, model, tasks, 1, 0.2, adapt="body", meta_batch=True).assert_close(RTOL, ATOL)
    assert_same_state(before, model_state(model))


def test_first_order_learner_is_first_order_maml_at_the_teacher():
    model, tasks = mlp([2, 5, 1]), [regression_task(s) for s in range(2)]
    lazymaml.MetaLearner(model, 6, 0.1, estimator="first_order", leap=0.5).meta_backward(tasks)
    want = [oracle.meta_gradient(model, t, 6, 0.1, leap=0.5, first_order=True) for t in tasks]
    got = {n: p.grad for n, p in model.named_parameters()}
    compare(got, {n: (want[0][n] + want[1][n]) / 2 for n in got}).assert_close(RTOL, ATOL)


def test_batchnorm_buffers_never_touched_by_meta_backward():
    model = conv_bn().train()
    buffers = copy.deepcopy(dict(model.named_buffers()))
    lazymaml.LazyMAML(model, 5, 0.1).meta_backward([image_task(0), image_task(1)])
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


def test_nothing_is_written_when_a_task_fails():
    model = mlp([2, 5, 1])
    before = model_state(model)
    bad = Task.from_closures(
        lambda f: f(torch.ones(2, 2, dtype=torch.float64)).sum() * float("nan"), lambda f: 0
    )
    with pytest.raises(FloatingPointError, match="inner step 1 of 3"):
        lazymaml.LazyMAML(model, 3, 0.1).meta_backward([regression_task(), bad])
    assert_same_state(before, model_state(model))


def test_adapt_returns_the_student_and_leaves_the_model():
    model, task = conv_bn().train(), image_task()
    before = model_state(model)
    student = lazymaml.LazyMAML(model, 3, 0.1, adapt="head").adapt(task)
    assert_same_state(before, model_state(model))

    reference = copy.deepcopy(model)  # three plain SGD steps on the head, the way a user would
    optimizer = torch.optim.SGD(reference[4].parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        task.support_loss(reference).backward()
        optimizer.step()
    for (n, p), q in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)
        assert p.grad is None
    torch.testing.assert_close(student[1].running_mean, reference[1].running_mean, rtol=1e-12, atol=1e-14)


def test_meta_training_reduces_post_adaptation_loss():
    torch.manual_seed(0)
    model = problems.mlp((40, 40))
    learner = lazymaml.LazyMAML(model, 5, 0.01)
    outer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    held_out = [problems.sinusoid(torch.Generator().manual_seed(10_000 + i)) for i in range(20)]

    def post_adaptation_mse():
        return sum(t.query_loss(learner.adapt(t)).item() for t in held_out) / len(held_out)

    before = post_adaptation_mse()
    for _ in range(60):
        outer.zero_grad()
        learner.meta_backward([problems.sinusoid(g) for _ in range(4)])
        outer.step()
    assert post_adaptation_mse() < 0.9 * before  # measured: 3.56 → 2.86 after 60 outer steps


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(steps=-1), ValueError, "steps must be >= 0"),
        (dict(leap=2.0), ValueError, "leap"),
        (dict(jacobian_step="double"), ValueError, 'jacobian_step must be "single", "horizon" or a float'),
        (dict(jacobian_step=-0.1), ValueError, "must be finite and >= 0"),
        (dict(adapt="nothing"), ValueError, "unknown parameters"),
    ],
)
def test_learner_refuses_bad_settings_at_construction(kwargs, error, pattern):
    args = dict(steps=2, inner_lr=0.1) | kwargs
    with pytest.raises(error, match=pattern):
        lazymaml.LazyMAML(mlp([2, 3, 1]), args.pop("steps"), args.pop("inner_lr"), **args)


def test_meta_backward_needs_tasks():
    with pytest.raises(ValueError, match="at least one task is needed"):
        lazymaml.LazyMAML(mlp([2, 3, 1]), 2, 0.1).meta_backward([])
