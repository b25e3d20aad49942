"""The batched meta-batch (``torch.func.vmap`` over tasks) against the sequential path and the definitions.

Every batched estimator is compared, in float64, with (a) the learner's sequential path — the
per-task building blocks of ``lazymaml.estimators`` — and (b) an independent computation from
the definition: the oracle (``higher``) for MAML, a flat-vector unroll (tests/helpers) for
truncated backprop and first-order MAML, and a flat-vector student with one Hessian-vector
product for lazy and Reptile. The returned loss is pinned to the mean of L_Q(φ_T) over tasks.

Tolerance: 1e-10 relative to the whole meta-gradient (each parameter's error ≤ 1e-10 (‖g_p‖ +
‖g‖)): the batched path must be the sequential one up to rounding. Both paths perform the same
float64 operations in a different order (batched kernels, reductions over stacked tasks), a few
ulps (~1e-16) per operation; through K ≤ 4 steps with α‖H‖ < 1 on these models that compounds to
below 1e-14 (measured ≤ 6e-16), four orders below the tolerance, while every real defect
measured here is ≥ 6e-4 (the broken variant below). The norm-wise atol is needed because some
gradients are zero in exact arithmetic (a convolution's bias feeding a train-mode BatchNorm),
where per-parameter relative error measures only rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import lazymaml
from gradcheck import Task, compare, oracle, strategies
from gradcheck.settings import InnerLoop
from lazymaml.batched import BATCH_STATISTICS, OUTSIDE, VERIFIED
from lazymaml.derivatives import DEFERRED, OutsideObjective
from tests.helpers import (
    F64,
    Flat,
    adapted_names,
    assert_same_state,
    conv_bn,
    image_task,
    mlp_problems,
    model_state,
    reference_meta_gradient,
    regression_task,
)

RTOL = 1e-10
BATCHED = ["maml", "truncated", "first_order", "lazy", "lazy_horizon", "reptile"]
GRAPH_FREE = ["first_order", "lazy", "lazy_horizon", "reptile"]


def assert_close(got, want, rtol=RTOL):
    report = compare(got, want)
    report.assert_close(rtol, rtol * report.overall.reference_norm + 1e-300)


def learn(model, tasks, steps, inner_lr, batched, **options):
    """(p.grad after one meta_backward on a copy of ``model``, the returned loss)."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lazymaml.SequentialFallback)  # batched=True must batch
        loss = lazymaml.MetaLearner(model, steps, inner_lr, batched=batched, **options).meta_backward(tasks)
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, loss


def reference(estimator, model, task, steps, inner_lr, adapt, leap, horizon=None):
    """(gradient, L_Q(φ_T)) on one task from the definitions, on one flat parameter vector."""
    flat = Flat(model, task, adapt)
    theta = flat.theta
    phi = theta.clone()
    for _ in range(steps):
        phi = phi.detach().requires_grad_()
        (g,) = torch.autograd.grad(flat.support(phi), phi)
        phi = (phi - inner_lr * flat.mask * g).detach()
    teacher = (theta + leap * (phi - theta)).requires_grad_()
    loss = flat.query(teacher)
    if estimator in ("maml", "truncated"):
        return reference_meta_gradient(
            model, task, steps, inner_lr, adapt, leap, horizon=horizon
        ), loss.detach()
    if estimator == "reptile":
        return flat.named((theta - phi) / (steps * inner_lr) if steps else 0 * theta), loss.detach()
    (v,) = torch.autograd.grad(loss, teacher)
    eta = {"first_order": 0, "lazy": leap * inner_lr, "lazy_horizon": leap * steps * inner_lr}[estimator]
    at = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(flat.support(at), at, create_graph=True)
    (h,) = torch.autograd.grad((flat.mask * g * v).sum(), at)
    return flat.named(v - (eta if steps else 0) * h), loss.detach()


def reference_mean(estimator, model, tasks, *args, **kwargs):
    results = [reference(estimator, model, t, *args, **kwargs) for t in tasks]
    gradient = {n: sum(g[n] for g, _ in results) / len(results) for n in results[0][0]}
    return gradient, sum(loss for _, loss in results) / len(results)


@given(
    problem=mlp_problems(),
    estimator=st.sampled_from(BATCHED),
    steps=st.integers(0, 4),
    inner_lr=st.floats(0.01, 0.3),
    leap=st.floats(0.1, 1.0),
    adapt=st.sampled_from([None, "head", "body"]),
    size=st.integers(1, 4),
    data=st.data(),
)
def test_batched_equals_sequential_equals_the_definition(
    problem, estimator, steps, inner_lr, leap, adapt, size, data
):
    model, task = problem
    inputs, outputs = model[0].in_features, model[-1].out_features
    tasks = [task] + [regression_task(100 + i, inputs, outputs) for i in range(size - 1)]
    options = dict(estimator=estimator, leap=leap, adapt=adapt)
    horizon = None
    if estimator == "truncated":
        options["horizon"] = horizon = data.draw(st.integers(0, steps), label="horizon")
    batched, batched_loss = learn(model, tasks, steps, inner_lr, True, **options)
    sequential, sequential_loss = learn(model, tasks, steps, inner_lr, False, **options)
    want, want_loss = reference_mean(estimator, model, tasks, steps, inner_lr, adapt, leap, horizon)
    assert_close(batched, sequential)
    assert_close(batched, want)
    assert_close(sequential, want)
    torch.testing.assert_close(batched_loss, want_loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(sequential_loss, want_loss, rtol=RTOL, atol=0)


@given(problem=mlp_problems(), steps=st.integers(1, 4), inner_lr=st.floats(0.01, 0.3), size=st.integers(1, 4))
def test_batched_maml_is_the_oracle_mean(problem, steps, inner_lr, size):
    """The exact second-order meta-gradient, batched, against ``higher`` (which shares nothing with it)."""
    model, task = problem
    tasks = [task] + [
        regression_task(200 + i, model[0].in_features, model[-1].out_features) for i in range(size - 1)
    ]
    got, _ = learn(model, tasks, steps, inner_lr, True, estimator="maml", leap=0.7, adapt="body")
    assert_close(got, oracle.meta_gradient(model, tasks, steps, inner_lr, leap=0.7, adapt="body"))


@given(
    problem=mlp_problems(),
    estimator=st.sampled_from(GRAPH_FREE),
    steps=st.integers(0, 5),
    leap=st.floats(0.1, 1.0),
    size=st.integers(1, 3),
)
def test_batched_adam_student_is_torch_optim_adam(problem, estimator, steps, leap, size):
    """The batched Adam student against ``torch.optim.Adam`` driving the sequential one."""
    model, task = problem
    tasks = [task] + [
        regression_task(300 + i, model[0].in_features, model[-1].out_features) for i in range(size - 1)
    ]
    options = dict(estimator=estimator, leap=leap, inner_optimizer="adam")
    batched, batched_loss = learn(model, tasks, steps, 0.05, True, **options)
    sequential, sequential_loss = learn(model, tasks, steps, 0.05, False, **options)
    assert_close(batched, sequential)
    torch.testing.assert_close(batched_loss, sequential_loss, rtol=RTOL, atol=0)


# Normalisation layers: the batched learner against the oracle, train and eval mode.
class HandWritten(nn.Module):
    """A MAML-Pytorch-style network: tensors in containers, ``F.*`` calls (``F.batch_norm`` with
    running statistics kept as frozen parameters) in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shapes = [(3, 1, 3, 3), (3,), (3,), (3,), (3, 48), (3,)]
        self.vars = nn.ParameterList(
            [nn.Parameter(0.3 * torch.randn(s, generator=g, dtype=F64)) for s in shapes]
        )
        self.stats = nn.ParameterDict(
            {
                "mean": nn.Parameter(0.1 * torch.randn(3, generator=g, dtype=F64), requires_grad=False),
                "var": nn.Parameter(1 + torch.rand(3, generator=g, dtype=F64), requires_grad=False),
            }
        )
        self.act = nn.ModuleList([nn.Tanh()])
        self.out = nn.ModuleDict({"head": nn.Identity()})

    def forward(self, x):
        w, b, gamma, beta, head_w, head_b = self.vars
        x = F.conv2d(x, w, b)
        x = F.batch_norm(x, self.stats["mean"], self.stats["var"], gamma, beta, training=self.training)
        x = self.act[0](x).flatten(1)
        return self.out["head"](F.linear(x, head_w, head_b))


def _with_norm(norm):
    model = conv_bn()
    model[1] = norm.to(F64)
    return model


NORM_MODELS = {
    "BatchNorm2d": conv_bn,
    "BatchNorm2d without running stats": lambda: _with_norm(nn.BatchNorm2d(3, track_running_stats=False)),
    "InstanceNorm2d": lambda: _with_norm(nn.InstanceNorm2d(3, affine=True)),
    "InstanceNorm2d with running stats": lambda: _with_norm(nn.InstanceNorm2d(3, track_running_stats=True)),
    "GroupNorm": lambda: _with_norm(nn.GroupNorm(1, 3)),
    "hand-written F.batch_norm": HandWritten,
}


def convolution_and_norm(name):
    """Adapt the convolution and the normalisation layer only (the head is meta-learned only)."""
    return name.startswith(("0.", "1.", "vars.0", "vars.1", "vars.2", "vars.3"))


@pytest.mark.parametrize("name", list(NORM_MODELS))
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("adapt", [None, convolution_and_norm], ids=["all", "conv+norm"])
def test_batched_normalisation_agrees_with_the_oracle(name, train, adapt):
    model, tasks = NORM_MODELS[name]().train(train), [image_task(s) for s in range(3)]
    before = model_state(model)
    got, _ = learn(model, tasks, 3, 0.2, True, estimator="maml", leap=0.8, adapt=adapt)
    assert_close(got, oracle.meta_gradient(model, tasks, 3, 0.2, leap=0.8, adapt=adapt))
    lazy, _ = learn(model, tasks, 3, 0.2, True, estimator="lazy", leap=0.8, adapt=adapt)
    assert_close(lazy, learn(model, tasks, 3, 0.2, False, estimator="lazy", leap=0.8, adapt=adapt)[0])
    assert_same_state(before, model_state(model))


def autograd_through_vmap(model, tasks, steps, inner_lr):
    """Deliberately broken: the lazy meta-gradient with its Hessian-vector product taken by ordinary
    autograd through ``vmap(torch.func.grad(...))`` — wrong with batch and instance norm on torch 2.13."""
    batch = Task.stack(tasks)
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss(p, x, y):
        return batch.loss(functional_call(model, {**buffers, **p}, (x,)), y)

    def query_gradient(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = grad(loss)(p, xs, ys)
            p = {n: p[n] - inner_lr * g[n] for n in p}
        return grad(loss)(p, xq, yq)

    with torch.no_grad():
        detached = {n: t.detach() for n, t in theta.items()}
        v = vmap(query_gradient, in_dims=(None, 0, 0, 0, 0))(detached, *batch.support, *batch.query)
    g = vmap(grad(loss), in_dims=(None, 0, 0))(theta, *batch.support)
    dot = sum((g[n] * v[n]).sum() for n in g) / len(tasks)
    h = dict(zip(theta, torch.autograd.grad(dot, list(theta.values()))))
    return {n: v[n].mean(0) - inner_lr * h[n] for n in v}


@pytest.mark.parametrize(
    "norm", [nn.BatchNorm2d(3, track_running_stats=False), nn.InstanceNorm2d(3, affine=True)], ids=repr
)
def test_the_broken_variant_is_caught(norm):
    """Why the batched path differentiates with torch.func alone: the same maths through ordinary
    autograd is off by 6e-4 (BatchNorm) and 1e-2 (InstanceNorm) relative here, and fails the check."""
    model, tasks = _with_norm(norm).train(), [image_task(s) for s in range(3)]
    want, _ = learn(model, tasks, 2, 0.2, False, estimator="lazy")
    assert_close(learn(model, tasks, 2, 0.2, True, estimator="lazy")[0], want)
    with pytest.raises(AssertionError):
        assert_close(autograd_through_vmap(model, tasks, 2, 0.2), want)


# Every module type the batched path vouches for, in a small model, against the sequential path.
def _vector(*layers):
    return nn.Sequential(nn.Linear(4, 6), *layers, nn.Linear(6, 3))


def _conv1d(*layers):
    return nn.Sequential(nn.Conv1d(2, 3, 3), *layers, nn.Flatten(), nn.LazyLinear(3))


def _conv2d(*layers):
    return nn.Sequential(nn.Conv2d(2, 4, 3), *layers, nn.Flatten(), nn.LazyLinear(3))


def _conv3d(*layers):
    return nn.Sequential(nn.Conv3d(2, 2, 2), *layers, nn.Flatten(), nn.LazyLinear(3))


COVERAGE = {  # name -> (model builder, input shape per example, the types it covers)
    "activations": (
        lambda: _vector(
            nn.Tanh(),
            nn.Linear(6, 6),
            nn.Sigmoid(),
            nn.Linear(6, 6),
            nn.Softplus(),
            nn.Linear(6, 6),
            nn.ELU(),
        ),
        (4,),
        {nn.Sequential, nn.Linear, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU},
    ),
    "more activations": (
        lambda: _vector(
            nn.GELU(),
            nn.Linear(6, 6),
            nn.SiLU(),
            nn.Linear(6, 6),
            nn.LeakyReLU(0.1),
            nn.Linear(6, 6),
            nn.ReLU(),
        ),
        (4,),
        {nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ReLU},
    ),
    "softmax, layer norm, dropout": (
        lambda: _vector(nn.LayerNorm(6), nn.Softmax(-1), nn.Linear(6, 6), nn.LogSoftmax(-1), nn.Dropout(0.5)),
        (4,),
        {nn.LayerNorm, nn.Softmax, nn.LogSoftmax, nn.Dropout},
    ),
    "shapes": (
        lambda: _vector(nn.Unflatten(1, (2, 3)), nn.Tanh(), nn.Flatten(), nn.Identity()),
        (4,),
        {nn.Unflatten, nn.Flatten, nn.Identity},
    ),
    "batch norm 1d": (lambda: _vector(nn.BatchNorm1d(6), nn.Tanh()), (4,), {nn.BatchNorm1d}),
    "conv1d": (
        lambda: _conv1d(
            nn.BatchNorm1d(3), nn.Tanh(), nn.MaxPool1d(2), nn.InstanceNorm1d(3, affine=True), nn.AvgPool1d(2)
        ),
        (2, 10),
        {nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d, nn.InstanceNorm1d},
    ),
    "conv2d": (
        lambda: _conv2d(nn.BatchNorm2d(4), nn.Tanh(), nn.MaxPool2d(2), nn.GroupNorm(2, 4), nn.AvgPool2d(1)),
        (2, 6, 6),
        {nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.GroupNorm, nn.AvgPool2d},
    ),
    "conv2d, instance norm": (
        lambda: _conv2d(nn.InstanceNorm2d(4, affine=True), nn.Softplus(), nn.AdaptiveAvgPool2d(2)),
        (2, 6, 6),
        {nn.InstanceNorm2d, nn.AdaptiveAvgPool2d},
    ),
    "conv3d": (
        lambda: _conv3d(nn.BatchNorm3d(2), nn.Tanh(), nn.InstanceNorm3d(2, affine=True)),
        (2, 3, 3, 3),
        {nn.Conv3d, nn.BatchNorm3d, nn.InstanceNorm3d},
    ),
    "containers": (
        HandWritten,
        (1, 6, 6),
        {nn.ParameterList, nn.ParameterDict, nn.ModuleList, nn.ModuleDict},
    ),
}


def _coverage_case(name, train):
    build, shape, _ = COVERAGE[name]
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(1)
    if name != "containers":
        model(torch.zeros(2, *shape))  # materialise LazyLinear
    model = model.to(F64).train(train)

    def task(seed):
        g.manual_seed(seed)
        x = torch.randn(4, *shape, generator=g, dtype=F64)
        y = torch.randn(4, 3, generator=g, dtype=F64)
        return Task((x, y), (x.flip(0) + 0.1, y.flip(0)), F.mse_loss)

    return model, [task(s) for s in range(3)]


def test_every_verified_module_type_is_covered():
    covered = set().union(*(types for _, _, types in COVERAGE.values()))
    assert covered == VERIFIED | BATCH_STATISTICS


@pytest.mark.parametrize("name", list(COVERAGE))
@pytest.mark.parametrize("train", [True, False])
def test_every_verified_module_type_batches_exactly(name, train):
    model, tasks = _coverage_case(name, train)
    if name == "softmax, layer norm, dropout" and train:
        model[-2].p = 0.0  # active dropout is refused (see the fallback tests)
    for estimator in ("maml", "lazy"):
        batched, _ = learn(model, tasks, 2, 0.1, True, estimator=estimator, leap=0.9)
        sequential, _ = learn(model, tasks, 2, 0.1, False, estimator=estimator, leap=0.9)
        assert_close(batched, sequential)


# When the batched path does not apply: sequential, said once (batched="auto"), or refused (True).
class Scale(nn.Module):
    """A module type the batched path has not verified, owning a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(6, dtype=F64))

    def forward(self, x):
        return x * self.weight


class Branching(nn.Module):
    """Data-dependent control flow, which vmap cannot batch (it raises)."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


def _regression_model(*middle):
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), *middle, nn.Linear(6, 1)).to(F64)


def _hooked():
    model = _regression_model()
    model[1].register_forward_hook(lambda module, inputs, output: None)
    return model


TASKS = [regression_task(s) for s in range(3)]
FALLBACKS = {  # name -> (model, tasks, learner options, the reason's words)
    "unequal shot counts": (
        lambda: _regression_model(),
        [regression_task(0, shots=6), regression_task(1, shots=5)],
        {},
        "cannot be stacked: Task.stack: task 1's support inputs is (5, 2)",
    ),
    "closure tasks": (
        lambda: _regression_model(),
        [Task.from_closures(t.support_loss, t.query_loss) for t in TASKS],
        {},
        "not data tasks",
    ),
    "different losses": (
        lambda: _regression_model(),
        [TASKS[0], Task(TASKS[1].support, TASKS[1].query, lambda out, y: F.mse_loss(out, y))],
        {},
        "different loss",
    ),
    "optimizer factory": (
        lambda: _regression_model(),
        TASKS,
        dict(inner_optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)),
        "is not batched (only names and specs",
    ),
    "imaml": (lambda: _regression_model(), TASKS, dict(estimator="imaml", lam=2.0), "conjugate gradient"),
    "unverified module": (lambda: _regression_model(Scale()), TASKS, {}, "'2' is a Scale"),
    "forward hooks": (_hooked, TASKS, {}, "'1' has forward hooks"),
    "active dropout": (lambda: _regression_model(nn.Dropout(0.1)), TASKS, {}, "active nn.Dropout"),
    "vmap raises": (lambda: _regression_model(Branching()), TASKS, {}, "batched computation raised"),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_fallback_is_sequential_said_once_and_exact(name):
    build, tasks, options, reason = FALLBACKS[name]
    model = build()
    torch.manual_seed(0)  # the same dropout masks
    want, want_loss = learn(model, tasks, 3, 0.1, False, **options)
    learner = lazymaml.MetaLearner(model, 3, 0.1, **options)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        loss = learner.meta_backward(tasks)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        learner.meta_backward(tasks)  # not said again
    assert [w.category for w in said] == [lazymaml.SequentialFallback], [str(w.message) for w in said]
    assert reason in str(said[0].message) and said[0].filename == __file__
    assert_close(grads, want)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_batched_true_refuses_instead(name):
    build, tasks, options, reason = FALLBACKS[name]
    model = build()
    before = model_state(model)
    with pytest.raises(ValueError, match="batched=True, but") as raised:
        lazymaml.MetaLearner(model, 3, 0.1, batched=True, **options).meta_backward(tasks)
    assert reason in str(raised.value)
    assert_same_state(before, model_state(model))


def test_batched_false_never_warns():
    model = _regression_model(Scale())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lazymaml.MetaLearner(model, 3, 0.1, batched=False).meta_backward(TASKS)


def test_a_non_finite_batched_result_reruns_sequentially_for_the_exact_error():
    """Batched losses are not checked inside vmap; the rerun names the step, and nothing is written."""
    model = with_grads(_regression_model())
    x, y = TASKS[1].support
    poisoned = Task(
        (x.clone().index_fill_(0, torch.tensor([2]), float("nan")), y), TASKS[1].query, F.mse_loss
    )
    before = model_state(model)
    with pytest.raises(FloatingPointError, match=r"support loss L_S\(φ_0\) at inner step 1 of 3 is nan"):
        lazymaml.MetaLearner(model, 3, 0.1).meta_backward([TASKS[0], poisoned, TASKS[2]])
    assert_same_state(before, model_state(model))


def infinite_offset(output, target):
    return F.mse_loss(output, target) + float("inf")  # a value that is inf, a gradient that is not


def test_a_non_finite_loss_with_finite_gradients_reruns_sequentially():
    """The batched check reads the losses, not only the gradients: here only the losses are inf."""
    model = with_grads(_regression_model())
    tasks = [Task(t.support, t.query, infinite_offset) for t in TASKS]
    before = model_state(model)
    with pytest.raises(FloatingPointError, match=r"support loss L_S\(φ_0\) at inner step 1 of 3 is inf"):
        lazymaml.MetaLearner(model, 3, 0.1, batched=True).meta_backward(tasks)
    assert_same_state(before, model_state(model))


class NanBackward(nn.Module):
    """The identity whose backward is nan: x + 0·√|x − x| (0·∞ in the derivative)."""

    def forward(self, x):
        return x + 0 * (x - x).abs().sqrt()


@pytest.mark.parametrize("batched", [True, "auto"])
def test_a_gradient_as_non_finite_sequentially_keeps_the_batched_path(batched):
    """Batching is not blamed for what the sequential path computes too: adapting the head only,
    every loss is finite and the body's meta-gradient is nan on both paths; it is returned as it
    is, nothing is said, and the next meta-batch still runs batched."""
    options = dict(adapt="head", batched=batched)
    learner = lazymaml.MetaLearner(_regression_model(NanBackward()), 3, 0.1, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lazymaml.SequentialFallback)
        for _ in range(2):
            learner.model.zero_grad(set_to_none=True)
            loss = learner.meta_backward(TASKS)
    assert torch.isfinite(loss) and not learner.cannot_batch
    assert torch.isnan(learner.model[0].weight.grad).all()
    reference = lazymaml.MetaLearner(_regression_model(NanBackward()), 3, 0.1, adapt="head", batched=False)
    reference.model.load_state_dict(learner.model.state_dict())
    reference.meta_backward(TASKS)
    for p, q in zip(learner.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


def test_a_batched_result_that_alone_is_not_finite_is_said_and_batching_stops(monkeypatch):
    """What a transform defect would do — nan from the batched path only (simulated here): the
    meta-batch is rerun sequentially, its finite result returned, the fallback said once, and
    batching off from then on; with ``batched=True`` it raises instead."""
    compute = lazymaml.batched.estimate

    def poisoned(*args, **kwargs):
        estimate = compute(*args, **kwargs)
        return dataclasses.replace(estimate, sums={n: t * float("nan") for n, t in estimate.sums.items()})

    monkeypatch.setattr(lazymaml.batched, "estimate", poisoned)
    learner = lazymaml.MetaLearner(_regression_model(), 3, 0.1)
    with pytest.warns(lazymaml.SequentialFallback, match="not finite where the sequential one is"):
        learner.meta_backward(TASKS)
    assert learner.cannot_batch and all(torch.isfinite(p.grad).all() for p in learner.model.parameters())
    with pytest.raises(ValueError, match="batched=True, but the batched result is not finite"):
        lazymaml.MetaLearner(_regression_model(), 3, 0.1, batched=True).meta_backward(TASKS)


def squared_errors(output, target):
    return (output - target) ** 2  # not reduced: a user's mistake


def test_a_users_error_surfaces_with_the_sequential_message():
    tasks = [Task(t.support, t.query, squared_errors) for t in TASKS]
    with pytest.raises(ValueError, match=r"inner step 1 of 3 must be a scalar \(0-dim\) tensor"):
        lazymaml.MetaLearner(_regression_model(), 3, 0.1).meta_backward(tasks)


def test_tasks_on_another_device_are_refused():
    model = _regression_model()
    (xs, ys), (xq, yq) = TASKS[0].support, TASKS[0].query
    elsewhere = Task((xs.to("meta"), ys.to("meta")), (xq.to("meta"), yq.to("meta")), F.mse_loss)
    learner = lazymaml.MetaLearner(model, 3, 0.1)
    with pytest.raises(
        ValueError, match="task 1's support inputs are on meta, the model's parameters on cpu"
    ):
        learner.meta_backward([TASKS[0], elsewhere])
    with pytest.raises(ValueError, match="on meta"):
        learner.adapt(elsewhere)


def with_grads(model):
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    return model


def fake_clock(*seconds):
    """A clock under which the learner's timed calls take ``seconds``, in order: two readings
    each. In auto's probe they are the whole meta-batch sequentially, then rounds of the batched
    sub-batches of 1 and 2 tasks; a reading beyond them raises StopIteration."""
    readings = iter([reading for s in seconds for reading in (0.0, s)])
    return lambda: next(readings)


def sizes_run_batched(monkeypatch):
    """The number of tasks in every batched computation from now on, in order."""
    sizes, estimate = [], lazymaml.batched.estimate

    def recording(entry, student, batch, *args):
        sizes.append(len(batch))
        return estimate(entry, student, batch, *args)

    monkeypatch.setattr(lazymaml.batched, "estimate", recording)
    return sizes


# (tasks, the timed calls' seconds, auto's estimates per task, the path it keeps): sequential
# first, then rounds (1 task, 2 tasks), while they have cost less than the sequential meta-batch
PROBES = {
    # 3 tasks: 0.6 s sequentially; the rounds cost 0.15, 0.26, 0.38, 0.5, 0.62 s: five, the most;
    # the fastest of each (0.05, 0.06) predicts 0.05 + 2 × 0.01 for 3 tasks
    "batched": (3, (0.6, 0.08, 0.07, 0.05, 0.06, 0.05, 0.07, 0.06, 0.06, 0.09, 0.08), (0.07 / 3, 0.2), True),
    # one round costs more than the sequential meta-batch, and two are the least: 0.2 + 2 × 0.2 s
    # for 3 tasks, batched
    "sequential": (3, (0.3, 0.2, 0.4, 0.25, 0.45), (0.2, 0.1), False),
    # 2 tasks batched cost more per task (0.155 s) than sequentially (0.1 s), but the fixed cost
    # is shared by all 8: 0.3 + 7 × 0.01 s < 0.8 s (two rounds: 0.61 s, then 1.22 s)
    "batched, a fixed cost amortised over B": (8, (0.8, 0.3, 0.31, 0.3, 0.31), (0.37 / 8, 0.1), True),
    # 2 tasks cost less than twice 1 task, but the cost per task, 0.19 s, is above 0.15 s
    "sequential, the cost per task": (8, (1.2, 0.2, 0.39, 0.2, 0.39, 0.2, 0.39), (1.53 / 8, 0.15), False),
}


@pytest.mark.parametrize("case", list(PROBES))
def test_auto_decides_once_from_sub_batches_of_one_and_two_tasks(case, monkeypatch):
    """The decision of the learner's docstring, under a fake clock: what is timed, how many rounds,
    the estimate for B tasks, the path kept, what is said — and that the probe runs no more than 2
    tasks batched (its memory), its warm-up of both shapes untimed (the first two batched calls,
    2 tasks then 1, read no clock)."""
    size, seconds, estimates, batched = PROBES[case]
    model = _regression_model()
    tasks = [regression_task(s) for s in range(size)]
    want, _ = learn(model, tasks, 3, 0.1, False)
    learner = lazymaml.MetaLearner(model, 3, 0.1)
    learner.clock = fake_clock(*seconds)  # each reading is taken, none more
    sizes = sizes_run_batched(monkeypatch)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for call in range(3):  # the second and third read no clock: the choice is made
            model.zero_grad(set_to_none=True)
            learner.meta_backward(tasks)
            assert_close({n: p.grad for n, p in model.named_parameters()}, want)
            if call == 0:
                assert max(sizes) == 2 and sizes[:2] == [2, 1] and len(sizes) == 2 + len(seconds) - 1
    assert sizes[len(seconds) + 1 :] == ([size, size] if batched else [])
    assert learner.seconds == pytest.approx(dict(zip(("batched", "sequential"), estimates)))
    if batched:
        assert not said and learner.cannot_batch is None
    else:
        b, s = (f"{1e3 * e:.3g}" for e in estimates)
        assert [str(w.message) for w in said] == [
            f"MetaLearner runs sequentially: measured {b} ms per task batched (B = {size}, "
            f"estimated from sub-batches of 1 and 2 tasks), {s} ms sequentially"
        ]
        assert said[0].filename == __file__ and learner.cannot_batch


def test_auto_probes_again_when_its_sequential_run_raises():
    """A user's error on the first meta-batch decides nothing: the next meta-batch probes afresh."""
    model = _regression_model()
    bad = [Task(t.support, t.query, squared_errors) for t in TASKS]
    learner = lazymaml.MetaLearner(model, 3, 0.1)
    learner.clock = fake_clock(0.015, 0.01, 0.011, 0.01, 0.011)  # the least, two rounds
    with pytest.raises(ValueError, match="must be a scalar"):
        learner.meta_backward(bad)
    assert not learner.decided and not learner.seconds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.meta_backward(TASKS)
    assert learner.decided and learner.cannot_batch is None


def test_auto_runs_a_single_task_sequentially_without_a_word():
    model = _regression_model()
    learner = lazymaml.MetaLearner(model, 3, 0.1)
    learner.clock = fake_clock()  # any reading would raise StopIteration
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.meta_backward(TASKS[0])
    assert not learner.seconds


# The outside layout: the outer gradient by one autograd backward after the vmap, where vouched for.
#
# Tolerance: the same 1e-10 (relative to the whole meta-gradient) as above, for the same reason.
# The outside layout performs the same float64 operations as the inside one and the sequential
# path, except that the sum over tasks happens inside autograd's backward (θ broadcast to B
# tasks) instead of over stacked per-task gradients, and the reverse sweep is one batched graph
# rather than B nested ``grad`` levels: reordered sums of a few terms each, a few ulps (~1e-16)
# per operation, compounding through K ≤ 4 steps with α‖H‖ < 1 on these models to below 1e-14
# (measured ≤ 1.9e-15 over 300 randomised examples of the property test, with
# HYPOTHESIS_PROFILE=thorough), four orders below the tolerance; a wrong layout (BatchNorm
# through autograd outside a vmap, the broken variant above) is off by ≥ 6e-4.
def unrolled(model, task, steps, inner_lr, adapt, leap, horizon):
    """∇_θ L_Q(θ + γ(φ_K − θ)) on one task by a torch.func unroll written here: ``grad`` of the
    unrolled SGD loop (the adapted names only; the first K − T steps count as the identity)."""
    theta = {n: p.detach() for n, p in model.named_parameters()}
    adapted = set(adapted_names(model, adapt))

    def loss(p, data):
        x, y = data
        return task.loss(functional_call(model, p, (x,)), y)

    def sgd(p, count):
        for _ in range(count):
            g = grad(loss)(p, task.support)
            p = {n: p[n] - inner_lr * g[n] if n in adapted else p[n] for n in p}
        return p

    start = sgd(theta, steps - horizon)

    def meta_objective(t):
        phi = sgd({n: t[n] + (start[n] - theta[n]) for n in t}, horizon)
        return loss({n: t[n] + leap * (phi[n] - t[n]) for n in t}, task.query)

    return grad(meta_objective)(theta)


def outside_layout(model, estimator="maml", **settings):
    """Whether the batched path takes the outside layout for ``model`` (MSE loss)."""
    entry = lazymaml.estimators.get(estimator)
    loop = entry.settings(InnerLoop(2, 0.1, **settings))
    return lazymaml.batched.why_inside(entry, loop, model, F.mse_loss) is None


@given(
    problem=strategies.problems(
        kinds=("mlp", "conv"), steps=st.integers(0, 4), adapt=strategies.adapts(), leap=strategies.leaps()
    ),
    estimator=st.sampled_from(["maml", "truncated"]),
    data=st.data(),
)
def test_outside_layout_equals_sequential_equals_a_func_unroll(problem, estimator, data):
    model, tasks, steps, inner_lr = problem.model, list(problem.tasks), problem.steps, problem.inner_lr
    adapt, leap = problem.adapt, problem.leap
    horizon = steps if estimator == "maml" else data.draw(st.integers(0, steps), label="horizon")
    options = dict(estimator=estimator, adapt=adapt, leap=leap)
    if estimator == "truncated":
        options["horizon"] = horizon
    assert outside_layout(model, estimator)
    batched, batched_loss = learn(model, tasks, steps, inner_lr, True, **options)
    sequential, sequential_loss = learn(model, tasks, steps, inner_lr, False, **options)
    per_task = [unrolled(model, t, steps, inner_lr, adapt, leap, horizon) for t in tasks]
    want = {n: sum(g[n] for g in per_task) / len(tasks) for n in per_task[0]}
    assert_close(batched, sequential)
    assert_close(batched, want)
    torch.testing.assert_close(batched_loss, sequential_loss, rtol=RTOL, atol=0)


@pytest.fixture
def outside_objectives(monkeypatch):
    """How many OutsideObjective have been made from now on (one per task of an outside layout)."""
    made, init = [], OutsideObjective.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(OutsideObjective, "__init__", counting)
    return made


def test_the_outside_layout_is_used_for_a_plain_mlp(outside_objectives):
    model, tasks = _regression_model(), TASKS
    got, _ = learn(model, tasks, 3, 0.1, True, estimator="maml", leap=0.8)
    assert outside_objectives
    assert_close(got, oracle.meta_gradient(model, tasks, 3, 0.1, leap=0.8))


class Wrapper(nn.Module):
    """A user's network class (it owns no tensors; its forward could do anything)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _regression_model()

    def forward(self, x):
        return self.inner(x)


def _instance_forward():
    model = _regression_model()
    model[1].forward = lambda x: torch.tanh(x)
    return model


def squared_error(output, target):
    return ((output - target) ** 2).mean()


IMAGES = [image_task(s) for s in range(3)]
INSIDE = {  # name -> (model, tasks, learner options, the reason's words)
    "BatchNorm2d": (conv_bn, IMAGES, {}, "is a BatchNorm2d"),
    "InstanceNorm2d": (lambda: _with_norm(nn.InstanceNorm2d(3, affine=True)), IMAGES, {}, "InstanceNorm2d"),
    "GroupNorm": (lambda: _with_norm(nn.GroupNorm(1, 3)), IMAGES, {}, "is a GroupNorm"),
    "LayerNorm": (lambda: _regression_model(nn.LayerNorm(6)), TASKS, {}, "is a LayerNorm"),
    "hand-written F.batch_norm": (HandWritten, IMAGES, {}, "is a HandWritten"),
    "a user's network class": (Wrapper, TASKS, {}, "the model is a Wrapper"),
    "eval-mode dropout": (lambda: _regression_model(nn.Dropout(0.5)).eval(), TASKS, {}, "is a Dropout"),
    "an instance's own forward": (_instance_forward, TASKS, {}, "its own forward"),
    "adam": (_regression_model, TASKS, dict(inner_optimizer="adam"), "not plain second-order SGD"),
    "a user's loss": (
        _regression_model,
        [Task(t.support, t.query, squared_error) for t in TASKS],
        {},
        "the loss is not one of OUTSIDE_LOSSES",
    ),
    "lazy": (_regression_model, TASKS, dict(estimator="lazy"), "does not return differentiate's"),
}


@pytest.mark.parametrize("name", list(INSIDE))
def test_the_outside_layout_is_not_used_where_it_is_not_vouched_for(name, outside_objectives):
    """Normalisation layers (autograd outside a vmap is wrong through batch norm on torch 2.13),
    anything unverified, Adam, a user's loss, other estimators: the inside layout, exact."""
    build, tasks, options, reason = INSIDE[name]
    model, options = build(), {"estimator": "maml", "leap": 0.8, **options}
    entry = lazymaml.estimators.get(options["estimator"])
    loop = entry.settings(InnerLoop(3, 0.1, leap=0.8, inner_optimizer=options.get("inner_optimizer", "sgd")))
    assert reason in lazymaml.batched.why_inside(entry, loop, model, tasks[0].loss)
    got, _ = learn(model, tasks, 3, 0.1, True, **options)
    assert not outside_objectives
    assert_close(got, learn(model, tasks, 3, 0.1, False, **options)[0])


def test_hooks_keep_the_inside_layout():
    model = _hooked()
    entry = lazymaml.estimators.get("maml")
    loop = entry.settings(InnerLoop(3, 0.1))
    assert "has hooks" in lazymaml.batched.why_inside(entry, loop, model, F.mse_loss)
    handle = nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        assert "global module hook" in lazymaml.batched.why_inside(
            entry, loop, _regression_model(), F.mse_loss
        )
    finally:
        handle.remove()
    assert lazymaml.batched.why_inside(entry, loop, _regression_model(), F.mse_loss) is None
    first_order = loop.replace(first_order=True)
    assert "not plain second-order SGD" in lazymaml.batched.why_inside(
        entry, first_order, _regression_model(), F.mse_loss
    )


OUTSIDE_COVERAGE = {  # name -> (model builder, input shape per example): each takes the outside layout
    "activations": COVERAGE["activations"][:2],
    "more activations": COVERAGE["more activations"][:2],
    "shapes": COVERAGE["shapes"][:2],
    "softmax": (lambda: _vector(nn.Softmax(-1), nn.Linear(6, 6), nn.LogSoftmax(-1)), (4,)),
    "conv1d": (lambda: _conv1d(nn.Tanh(), nn.MaxPool1d(2), nn.AvgPool1d(2)), (2, 10)),
    "conv2d": (
        lambda: _conv2d(nn.Softplus(), nn.MaxPool2d(2), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(1)),
        (2, 6, 6),
    ),
    "conv3d": (lambda: _conv3d(nn.Tanh()), (2, 3, 3, 3)),
}


def _outside_case(name):
    build, shape = OUTSIDE_COVERAGE[name]
    torch.manual_seed(0)
    model = build()
    model(torch.zeros(2, *shape))  # materialise LazyLinear
    model = model.to(F64)
    g = torch.Generator().manual_seed(1)

    def task(seed):
        g.manual_seed(seed)
        x = torch.randn(4, *shape, generator=g, dtype=F64)
        return Task(
            (x, torch.randn(4, 3, generator=g, dtype=F64)),
            (x.flip(0) + 0.1, torch.randn(4, 3, generator=g, dtype=F64)),
            F.mse_loss,
        )

    return model, [task(s) for s in range(3)]


def test_every_outside_module_type_is_covered():
    covered = {type(m) for name in OUTSIDE_COVERAGE for m in _outside_case(name)[0].modules()}
    assert covered == OUTSIDE


@pytest.mark.parametrize("name", list(OUTSIDE_COVERAGE))
def test_every_outside_module_type_takes_the_outside_layout_exactly(name, outside_objectives):
    model, tasks = _outside_case(name)
    assert outside_layout(model)
    batched, _ = learn(model, tasks, 2, 0.1, True, estimator="maml", leap=0.9)
    assert outside_objectives
    assert_close(batched, learn(model, tasks, 2, 0.1, False, estimator="maml", leap=0.9)[0])
    per_task = [unrolled(model, t, 2, 0.1, None, 0.9, 2) for t in tasks]
    assert_close(batched, {n: sum(g[n] for g in per_task) / 3 for n in per_task[0]})


def test_the_outside_objective_differentiates_with_respect_to_theta_only():
    """Another point than the θ the vmap was given cannot be differentiated outside it."""
    model = _regression_model()
    student = lazymaml.estimators.Student.read(model)
    leaves = {n: t.detach().requires_grad_() for n, t in student.theta.items()}
    f = OutsideObjective(student, TASKS[0], InnerLoop(1, 0.1), student.theta, leaves)
    elsewhere = {n: t.clone() for n, t in student.theta.items()}
    with pytest.raises(ValueError, match="with respect to θ only"):
        f.differentiate(lambda t, u: (f.query(t, u), None), elsewhere, {})
    g, value, _ = f.differentiate(lambda t, u: (f.query(t, u), None), student.theta, {})
    assert list(g) == [DEFERRED] and g[DEFERRED] is value and value.requires_grad


def test_an_entry_declaring_outside_without_differentiating_is_refused():
    """The deferred gradient stands for ∇_θ of the value: an entry that scales it is still exact
    (a linear map of the gradient is that of the value); one that never calls ``differentiate``
    but declares ``outside`` is refused, not given a wrong gradient."""
    maml = lazymaml.estimators.get("maml")

    def halved(f, theta, untrained):
        g, loss, losses = maml.per_task(f, theta, untrained)
        return {n: 0.5 * t for n, t in g.items()}, loss, losses

    halved_entry = dataclasses.replace(maml, name="halved", per_task=halved)
    model = _regression_model()
    got, _ = learn(model, TASKS, 2, 0.1, True, estimator=halved_entry)
    assert_close(got, learn(model, TASKS, 2, 0.1, False, estimator=halved_entry)[0])
    assert_close(
        got, {n: 0.5 * g for n, g in learn(model, TASKS, 2, 0.1, False, estimator="maml")[0].items()}
    )
    lazy = dataclasses.replace(lazymaml.estimators.get("lazy"), name="lazy_outside", outside=True)
    with pytest.raises(ValueError, match="did not return differentiate's gradient as it is"):
        lazymaml.MetaLearner(model, 2, 0.1, estimator=lazy, batched=True).meta_backward(TASKS)
