"""The meta-learner: what meta_backward writes and returns, adapt, settings — on either path.

Tolerances: float64 identities to rtol 1e-10 (rounding measured below 1e-14); see test_batched
for the batched path's derivation.
"""

import copy

import pytest
import torch
import torch.nn.utils.prune

import lazymaml
from gradcheck import Task, compare, oracle, problems, validate
from gradcheck.settings import InnerLoop
from gradcheck.state import preserved
from gradcheck.student import Student
from lazymaml.estimators import REGISTRY, as_function
from tests.helpers import (
    assert_same_state,
    conv_bn,
    image_task,
    mlp,
    model_state,
    regression_task,
)

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


def teacher_query_loss(model, task, steps, inner_lr, leap):
    """L_Q(φ_T) the way a user would compute it: torch.optim.SGD on a copy, then the leap."""
    student = copy.deepcopy(model)
    optimizer = torch.optim.SGD(student.parameters(), lr=inner_lr)
    for _ in range(steps):
        optimizer.zero_grad()
        task.support_loss(student).backward()
        optimizer.step()
    with torch.no_grad():
        for p, theta in zip(student.parameters(), model.parameters()):
            p.copy_(theta + leap * (p - theta))
        return task.query_loss(student)


@pytest.mark.parametrize("batched", [True, False])
def test_meta_backward_returns_the_mean_query_loss_and_writes_the_mean_gradient(batched):
    """Pinned by value against independent computations: a sum over tasks (or a mean of the wrong
    thing) fails both, as does a loss taken at φ_K instead of the teacher."""
    model, tasks = mlp([2, 5, 1]), [regression_task(s) for s in range(3)]
    learner = lazymaml.MetaLearner(model, 4, 0.1, estimator="maml", leap=0.6, batched=batched)
    loss = learner.meta_backward(tasks)
    want = [teacher_query_loss(model, t, 4, 0.1, 0.6) for t in tasks]
    torch.testing.assert_close(loss, sum(want) / 3, rtol=RTOL, atol=0)
    assert abs(loss - teacher_query_loss(model, tasks[0], 4, 0.1, 1.0)) > 1e-3  # the leap matters here
    compare(
        {n: p.grad for n, p in model.named_parameters()}, oracle.meta_gradient(model, tasks, 4, 0.1, leap=0.6)
    ).assert_close(RTOL, ATOL)


@pytest.mark.filterwarnings("ignore::lazymaml.SequentialFallback")  # "imaml" runs sequentially
@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("batched", ["auto", False])
def test_the_learner_of_each_estimator_writes_its_functions_mean(name, batched):
    """One machinery for every estimator: MetaLearner(estimator=name) == lazymaml.estimators[name]."""
    model, tasks = conv_bn().train(), [image_task(s) for s in range(3)]
    options = dict(leap=0.8, adapt="body") | (dict(lam=3.0) if name == "imaml" else {})
    learner = lazymaml.MetaLearner(model, 2, 0.1, estimator=name, batched=batched, **options)
    learner.meta_backward(tasks)
    got = {n: p.grad for n, p in model.named_parameters()}
    want = as_function(name)(model, tasks, 2, 0.1, **options)
    report = compare(got, want)
    report.assert_close(RTOL, RTOL * report.overall.reference_norm)


@pytest.mark.filterwarnings("ignore::lazymaml.SequentialFallback")
def test_imaml_learner_adapts_with_the_proximal_student():
    model, task = mlp([2, 5, 1]), regression_task()
    adapted = lazymaml.MetaLearner(model, 5, 0.1, estimator="imaml", lam=4.0).adapt(task)
    plain = lazymaml.MetaLearner(model, 5, 0.1, estimator="lazy").adapt(task)
    reference = copy.deepcopy(model)  # the proximal student by hand: steps on L_S + (λ/2)‖φ − θ‖²
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        proximal = sum(((p - q) ** 2).sum() for p, q in zip(reference.parameters(), model.parameters()))
        (task.support_loss(reference) + 2.0 * proximal).backward()
        optimizer.step()
    for p, q in zip(adapted.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(adapted[0].weight, plain[0].weight)


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


@pytest.mark.filterwarnings("ignore::lazymaml.SequentialFallback")  # closure tasks run sequentially
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
        (dict(estimator="maml2"), ValueError, "unknown estimator 'maml2'"),
        (dict(estimator="lazy", horizon=2), ValueError, "horizon= is a setting of estimator 'truncated'"),
        (dict(estimator="truncated", lam=1.0), ValueError, "lam= is a setting of estimator 'imaml', not"),
        (dict(estimator="maml", jacobian_step="horizon"), ValueError, "jacobian_step= .* not of 'maml'"),
        (
            dict(estimator="truncated", inner_optimizer="adam"),
            ValueError,
            r"estimator 'truncated' differentiates exactly through inner_optimizer in \['sgd'\]",
        ),
        (dict(estimator="truncated", horizon=3), ValueError, r"horizon must be an integer in \[0, steps=2\]"),
        (dict(estimator="imaml", lam=0.0), ValueError, "lam"),
        (dict(batched="yes"), ValueError, 'batched must be True, False or "auto"'),
        (
            dict(estimator="imaml", batched=True),
            ValueError,
            "batched=True, but estimator='imaml' is not batched",
        ),
    ],
)
def test_learner_refuses_bad_settings_at_construction(kwargs, error, pattern):
    args = dict(steps=2, inner_lr=0.1) | kwargs
    model = mlp([2, 3, 1])
    before = model_state(model)
    with pytest.raises(error, match=pattern):
        lazymaml.MetaLearner(model, args.pop("steps"), args.pop("inner_lr"), **args)
    assert_same_state(before, model_state(model))


def test_meta_backward_needs_tasks():
    with pytest.raises(ValueError, match="at least one task is needed"):
        lazymaml.LazyMAML(mlp([2, 3, 1]), 2, 0.1).meta_backward([])


def test_a_loss_that_writes_to_the_real_model_is_undone():
    """A data task's loss function that writes a buffer of the real model: torch.func refuses
    the mutation of a captured tensor, so auto reruns the tasks sequentially, where the write
    happens — and the guard undoes it."""
    model = conv_bn().train()
    before = model_state(model)

    def writing_loss(output, target):
        model[1].running_var.add_(1.0)
        return torch.nn.functional.cross_entropy(output, target)

    tasks = [Task(t.support, t.query, writing_loss) for t in (image_task(s) for s in range(3))]
    with pytest.warns(lazymaml.SequentialFallback, match="mutate a captured Tensor"):
        lazymaml.MetaLearner(model, 2, 0.1).meta_backward(tasks)
    model.zero_grad(set_to_none=True)
    assert_same_state(before, model_state(model))


@pytest.mark.filterwarnings("ignore::lazymaml.SequentialFallback")  # hooks: sequential
@pytest.mark.parametrize("kind", ["prune", "weight_norm"])
def test_adapt_copies_a_model_whose_hooks_keep_a_non_leaf_weight(kind):
    """prune and the hook-based weight_norm keep `weight` as a non-leaf plain attribute, which
    copy.deepcopy refuses; the adapted copy computes what the student's K steps give."""
    model, task = mlp([2, 5, 1]), regression_task()
    if kind == "prune":
        torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.4)
    else:
        torch.nn.utils.weight_norm(model[0])
    x = task.query[0]
    model(x)  # the hook writes the attribute
    before = model_state(model)
    learner = lazymaml.MetaLearner(model, 3, 0.1)
    adapted = learner.adapt(task)
    assert_same_state(before, model_state(model))
    phi, untrained = Student.read(model).run(task, InnerLoop(3, 0.1))
    with preserved(model):  # the hooks write model[0].weight when the student's model runs
        want = Student.read(model).at(phi, untrained)(x)
    torch.testing.assert_close(adapted(x), want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("wrap", "pattern"),
    [
        (lambda m: torch.nn.DataParallel(m), "pass model.module"),
        (lambda m: m.float(), r"parameters are torch.float32 but task 0's .* are torch.float64"),
    ],
)
def test_the_learner_and_the_estimators_refuse_what_the_checkers_refuse(wrap, pattern):
    model, task = wrap(mlp([2, 3, 1])), regression_task()
    with pytest.raises(TypeError, match=pattern):
        lazymaml.MetaLearner(model, 2, 0.1).meta_backward([task, task])
    with pytest.raises(TypeError, match=pattern):
        lazymaml.meta_gradient(model, task, 2, 0.1)
