"""Learned inner rates, a multi-step loss and a step index: the oracle against independent
computations, in float64.

The independent computations are (a) ``unrolled`` below — the inner loop written out over
``torch.func.functional_call`` with explicit steps φ_{k+1} = φ_k − α_k ⊙ g_k, the multi-step loss
and the step index, differentiated by autograd with respect to θ and the rates — (b) the
coordinate-wise central differences of :func:`gradcheck.finite_differences.meta_gradient`, which
run the graph-free student and perturb each rate entry as a coordinate, and (c) for first-order
MAML the closed form ∂F/∂α_k = −λ_{k+1} ⊙ g_k with the inner gradients detached.

Tolerances. Against (a): rtol 1e-10, atol 1e-13, as in test_oracle.py (the same float64 quantity
by another order of operations, ~1e-15 per operation). Against (b):
:data:`gradcheck.tolerances.COORDINATEWISE`, and the largest entrywise difference relative to the
largest entry, ``relative``, at most 1e-8: central differences at h = 1e-6 carry ε|F|/h +
h²|F‴|/6 ≈ 1e-10 on these O(1) objectives (measured 1e-10 … 1e-9 here), and a missing term
(a rate gradient without its sum over steps, an index off by one) moves entries by 1e-3 or more.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from gradcheck import Task, compare, finite_differences, oracle
from gradcheck.rates import coordinates
from gradcheck.settings import InnerLoop
from gradcheck.student import Student
from gradcheck.tolerances import COORDINATEWISE
from tests.helpers import assert_same_state, mlp, model_state, regression_task, with_gradients

F64 = torch.float64
RTOL, ATOL = 1e-10, 1e-13
FD_RELATIVE = 1e-8


def relative(got, want):
    """max |got − want| over every entry of every key, over the largest |want| entry."""
    assert got.keys() == want.keys()
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    return diff / max(want[k].abs().max().item() for k in want)


def against_differences(model, task, steps, inner_lr, **kwargs):
    """The oracle, checked against coordinate-wise finite differences; returns both."""
    got = oracle.meta_gradient(model, task, steps, inner_lr, **kwargs)
    fd = finite_differences.meta_gradient(model, task, steps, inner_lr, **kwargs)
    compare(got, fd).assert_close(*COORDINATEWISE)
    assert relative(got, fd) <= FD_RELATIVE, relative(got, fd)
    return got, fd


def unrolled(model, task, steps, rate, wrt, adapted=None, weights=None, kwarg=None, first_order=False):
    """F and its gradient with respect to ``wrt`` ({key: tensor}: the model's trainable parameters
    by name and any external rate tensors), written out here: ``rate(name, k)`` is α_k[name]."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    adapted = list(params) if adapted is None else adapted
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    (xs, ys), (xq, yq) = task.support, task.query

    def loss(phi, x, y, k):
        out = functional_call(model, {**phi, **buffers}, (x,), {kwarg: k} if kwarg else {})
        return task.loss(out, y)

    phi, objective = dict(params), torch.zeros((), dtype=F64)
    for k in range(steps):
        grads = torch.autograd.grad(
            loss(phi, xs, ys, k), [phi[n] for n in adapted], create_graph=not first_order
        )
        for n, g in zip(adapted, grads):
            phi[n] = phi[n] - rate(n, k) * (g.detach() if first_order else g)
        if weights is not None:
            objective = objective + weights[k] * loss(phi, xq, yq, k)
    if weights is None:
        objective = loss(phi, xq, yq, max(steps - 1, 0))
    grads = torch.autograd.grad(objective, list(wrt.values()), allow_unused=True)
    return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(wrt.items(), grads)}


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def rates_like(model, steps=None, per_entry=True, seed=0, requires_grad=True):
    """Rates in [0.05, 0.3]: per entry (the parameter's shape) or per parameter (shape ()), with a
    leading dimension of ``steps`` entries when given."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in trainable(model).items():
        shape = ((steps,) if steps else ()) + (tuple(p.shape) if per_entry else ())
        out[n] = (0.05 + 0.25 * torch.rand(shape, generator=g, dtype=F64)).requires_grad_(requires_grad)
    return out


# --- Meta-SGD and LSLR rates as external tensors, a multi-step loss ---------------------------


@given(
    steps=st.integers(1, 3),
    per_entry=st.booleans(),
    per_step=st.sampled_from([None, 0, 1]),  # no step dimension, S = K, S = K + 1
    weighted=st.booleans(),
    width=st.integers(2, 4),
)
def test_external_rates_match_the_written_out_unroll(steps, per_entry, per_step, weighted, width):
    model, task = mlp([2, width, 1]), regression_task()
    lr = rates_like(model, None if per_step is None else steps + per_step, per_entry)
    weights = [0.5 + k for k in range(steps)] if weighted else None
    got = oracle.meta_gradient(
        model, task, steps, lr, per_step_lr=per_step is not None, query_weights=weights
    )
    wrt = {**trainable(model), **{f"inner_lr.{n}": t for n, t in lr.items()}}
    want = unrolled(
        model, task, steps, lambda n, k: lr[n][k] if per_step is not None else lr[n], wrt, weights=weights
    )
    compare(got, want).assert_close(RTOL, ATOL)


@pytest.mark.parametrize(
    ("per_entry", "per_step", "weighted"),
    [(True, None, False), (True, 0, True), (False, 1, True), (False, None, False)],
    ids=["meta-sgd", "per-entry-per-step+multi-step", "lslr-K+1+multi-step", "per-layer"],
)
def test_external_rates_match_finite_differences(per_entry, per_step, weighted):
    model, task, steps = mlp([2, 3, 1]), regression_task(), 3
    lr = rates_like(model, None if per_step is None else steps + per_step, per_entry, seed=1)
    weights = [0.2, 0.3, 1.0] if weighted else None
    got, _ = against_differences(
        model, task, steps, lr, per_step_lr=per_step is not None, query_weights=weights
    )
    assert {k for k in got if k.startswith("inner_lr.")} == {f"inner_lr.{n}" for n in lr}
    if per_step == 1:  # α_K of K + 1 is never used: zero gradient, and the differences agree
        assert all(got[f"inner_lr.{n}"][steps].abs().max() == 0 for n in lr)


def test_a_learned_scalar_alpha():
    model, task = mlp([2, 4, 1]), regression_task()
    alpha = torch.tensor(0.2, dtype=F64, requires_grad=True)
    got, _ = against_differences(model, task, 3, alpha)
    assert set(got) == {*trainable(model), "inner_lr"}
    want = unrolled(model, task, 3, lambda n, k: alpha, {**trainable(model), "inner_lr": alpha})
    compare(got, want).assert_close(RTOL, ATOL)
    # the θ part is the float-α meta-gradient at the same value
    plain = oracle.meta_gradient(model, task, 3, 0.2)
    compare({n: got[n] for n in plain}, plain).assert_close(RTOL, ATOL)


def test_a_per_step_scalar_alpha_given_alone():
    model, task = mlp([2, 3, 1]), regression_task()
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64, requires_grad=True)  # K + 1 entries
    got, _ = against_differences(model, task, 3, alpha, per_step_lr=True)
    want = unrolled(model, task, 3, lambda n, k: alpha[k], {**trainable(model), "inner_lr": alpha})
    compare(got, want).assert_close(RTOL, ATOL)


def test_rates_that_do_not_require_grad_are_constants():
    model, task = mlp([2, 3, 1]), regression_task()
    lr = rates_like(model, 3, per_entry=True, requires_grad=False)
    got, _ = against_differences(model, task, 3, lr, per_step_lr=True)
    assert set(got) == set(trainable(model))  # no rate key
    want = unrolled(model, task, 3, lambda n, k: lr[n][k], trainable(model))
    compare(got, want).assert_close(RTOL, ATOL)


def test_rates_on_part_of_the_model():
    model, task = mlp([2, 3, 1]), regression_task()
    head = ["2.weight", "2.bias"]
    lr = {n: t for n, t in rates_like(model).items() if n in head}
    got, _ = against_differences(model, task, 2, lr, adapt=head)
    wrt = {**trainable(model), **{f"inner_lr.{n}": t for n, t in lr.items()}}
    compare(got, unrolled(model, task, 2, lambda n, k: lr[n], wrt, adapted=head)).assert_close(RTOL, ATOL)


def test_the_multi_step_loss_is_not_the_final_query_loss():
    """The weights change the result (the test above could not fail otherwise), and one weight on
    the last step is exactly L_Q(φ_K)."""
    model, task = mlp([2, 3, 1]), regression_task()
    lr = rates_like(model, per_entry=False)
    final = oracle.meta_gradient(model, task, 3, lr)
    last = oracle.meta_gradient(model, task, 3, lr, query_weights=[0.0, 0.0, 1.0])
    compare(last, final).assert_close(RTOL, ATOL)
    multi = oracle.meta_gradient(model, task, 3, lr, query_weights=[1.0, 1.0, 1.0])
    assert not compare(multi, final).ok(1e-3, 0.0)


@pytest.mark.parametrize("first_order", [False, True])
def test_a_multi_step_loss_with_one_float_alpha(first_order):
    model, task = mlp([2, 3, 1]), regression_task()
    weights = [0.25, 0.5, 1.0]
    got = oracle.meta_gradient(model, task, 3, 0.2, query_weights=weights, first_order=first_order)
    want = unrolled(
        model, task, 3, lambda n, k: 0.2, trainable(model), weights=weights, first_order=first_order
    )
    compare(got, want).assert_close(RTOL, ATOL)
    if not first_order:
        against_differences(model, task, 3, 0.2, query_weights=weights)


def test_rates_on_a_model_with_hooks():
    """A forward hook is run by both unrolls (functional_call runs the model's modules)."""
    model, task = mlp([2, 3, 1]), regression_task()
    model[1].register_forward_hook(lambda module, args, out: 0.5 * out + 0.1)
    lr = rates_like(model)
    got, _ = against_differences(model, task, 2, lr)
    wrt = {**trainable(model), **{f"inner_lr.{n}": t for n, t in lr.items()}}
    compare(got, unrolled(model, task, 2, lambda n, k: lr[n], wrt)).assert_close(RTOL, ATOL)


# --- learn2learn's MetaSGD layout: the rates are parameters of the model ----------------------


class MetaSGDLike(nn.Module):
    """The network as ``module`` and one rate per entry of each of its parameters as ``lrs``
    (an ``nn.ParameterList`` in the network's parameter order, or an ``nn.ParameterDict`` keyed by
    the name with dots as underscores), with a leading step dimension of ``steps`` when given."""

    def __init__(self, container="list", steps=None, seed=0):
        super().__init__()
        self.module = mlp([2, 3, 1], seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        lead = (steps,) if steps else ()
        rates = {
            n.replace(".", "_"): nn.Parameter(
                0.05 + 0.25 * torch.rand(lead + p.shape, generator=g, dtype=F64)
            )
            for n, p in self.module.named_parameters()
        }
        self.lrs = nn.ParameterList(rates.values()) if container == "list" else nn.ParameterDict(rates)

    def forward(self, x):
        return self.module(x)

    def inner_lr(self):
        """{adapted name: its rate parameter}, as the user passes it."""
        names = [n for n, _ in self.module.named_parameters()]
        if isinstance(self.lrs, nn.ParameterList):
            return {f"module.{n}": rate for n, rate in zip(names, self.lrs)}
        return {f"module.{n}": self.lrs[n.replace(".", "_")] for n in names}


@pytest.mark.parametrize("container", ["list", "dict"])
@pytest.mark.parametrize("steps_dim", [None, 3, 4], ids=["per-entry", "per-step-K", "per-step-K+1"])
def test_model_owned_rates_get_their_gradient_under_their_names(container, steps_dim):
    model, task, steps = MetaSGDLike(container, steps_dim), regression_task(), 3
    lr = model.inner_lr()
    kwargs = dict(per_step_lr=steps_dim is not None)
    _, adapted, _ = coordinates(model, None, InnerLoop(steps, lr, **kwargs).inner_lr, steps)
    assert adapted == tuple(lr)  # adapt=None leaves the rates out
    got, _ = against_differences(model, task, steps, lr, **kwargs)
    assert set(got) == set(trainable(model))  # rates under lrs.*, no inner_lr key
    rate = (lambda n, k: lr[n][k]) if steps_dim else (lambda n, k: lr[n])
    want = unrolled(model, task, steps, rate, trainable(model), adapted=list(lr))
    compare(got, want).assert_close(RTOL, ATOL)
    assert all(got[n].abs().max() > 0 for n in trainable(model) if n.startswith("lrs."))


def test_model_owned_rates_with_part_of_the_network_adapted():
    model, task = MetaSGDLike(), regression_task()
    head = ["module.2.weight", "module.2.bias"]
    lr = {n: t for n, t in model.inner_lr().items() if n in head}
    got, _ = against_differences(model, task, 2, lr, adapt=head)
    want = unrolled(model, task, 2, lambda n, k: lr[n], trainable(model), adapted=head)
    compare(got, want).assert_close(RTOL, ATOL)
    assert got["lrs.0"].abs().max() == 0  # the rate of a parameter not adapted, not given: unused


def test_the_head_preset_is_chosen_among_the_parameters_that_are_not_rates():
    """ANIL with learn2learn's layout, rates for the head only: ``lrs`` is the last module
    holding parameters, but its tensors are the rates; "head" is the network's last layer."""
    model, task = MetaSGDLike(), regression_task()
    chosen = ["module.2.weight", "module.2.bias"]
    model.lrs = nn.ParameterList([model.lrs[2], model.lrs[3]])  # the head's rates only
    lr = dict(zip(chosen, model.lrs))
    _, adapted, _ = coordinates(model, "head", InnerLoop(2, lr).inner_lr, 2)
    assert list(adapted) == chosen
    with pytest.raises(ValueError, match="are inner learning rates"):
        coordinates(model, ["module.2", "lrs"], InnerLoop(2, lr).inner_lr, 2)  # named: refused
    got, _ = against_differences(model, task, 2, lr, adapt="head")
    want = unrolled(model, task, 2, lambda n, k: lr[n], trainable(model), adapted=chosen)
    compare(got, want).assert_close(RTOL, ATOL)


# --- MAML++: per-step BatchNorm told the step, LSLR K + 1 rates, a multi-step loss -------------


class PerStepBatchNorm(nn.Module):
    """BatchNorm with one affine pair and one pair of running statistics per step: weight, bias
    and the running buffers have shape (steps, C); ``forward(x, num_step)`` normalises by the
    batch's statistics in training (updating row ``num_step`` of the running ones, momentum 0.1)
    and by row ``num_step`` of the running ones in eval mode."""

    def __init__(self, channels, steps, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(0.5 + torch.rand(steps, channels, generator=g, dtype=F64))
        self.bias = nn.Parameter(0.5 * torch.randn(steps, channels, generator=g, dtype=F64))
        self.register_buffer("running_mean", 0.3 * torch.randn(steps, channels, generator=g, dtype=F64))
        self.register_buffer("running_var", 0.5 + torch.rand(steps, channels, generator=g, dtype=F64))

    def forward(self, x, num_step):
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean[num_step].lerp_(mean, 0.1)
                self.running_var[num_step].lerp_(var, 0.1)
        else:
            mean, var = self.running_mean[num_step], self.running_var[num_step]
        return (x - mean) / (var + 1e-5).sqrt() * self.weight[num_step] + self.bias[num_step]


class MAMLPlusPlusNet(nn.Module):
    def __init__(self, steps, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(2, 4).double()
        self.norm = PerStepBatchNorm(4, steps, seed)
        self.out = nn.Linear(4, 1).double()

    def forward(self, x, num_step):
        return self.out(torch.tanh(self.norm(self.inp(x), num_step)))


@pytest.mark.parametrize("train", [True, False])
def test_maml_plus_plus(train):
    steps = 3
    model, task = with_gradients(MAMLPlusPlusNet(steps).train(train)), regression_task(shots=8)
    lr = rates_like(model, steps + 1, per_entry=False, seed=2)  # LSLR: per layer, per step, K + 1
    weights = [0.1, 0.3, 0.6]
    kwargs = dict(per_step_lr=True, query_weights=weights, step_kwarg="num_step")
    before = model_state(model)
    got, _ = against_differences(model, task, steps, lr, **kwargs)
    assert_same_state(before, model_state(model))
    wrt = {**trainable(model), **{f"inner_lr.{n}": t for n, t in lr.items()}}
    want = unrolled(model, task, steps, lambda n, k: lr[n][k], wrt, weights=weights, kwarg="num_step")
    compare(got, want).assert_close(RTOL, ATOL)
    # every step's row of the per-step BatchNorm is used: none of its gradient rows is zero
    assert all(got[n].abs().amax(1).min() > 0 for n in ("norm.weight", "norm.bias"))


def test_the_step_index_convention():
    """Support loss of step k and the query loss after it see k; the final query loss sees K − 1
    (0 at K = 0): the model records what it is told."""
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1).double()

        def forward(self, x, num_step):
            seen.append((x.shape[0], num_step))
            return self.linear(x)

    task = regression_task(shots=6, queries=7)
    for steps, weights, want in [
        (3, None, [(6, 0), (6, 1), (6, 2), (7, 2)]),
        (3, [1.0, 1.0, 1.0], [(6, 0), (7, 0), (6, 1), (7, 1), (6, 2), (7, 2)]),
        (0, None, [(7, 0)]),
    ]:
        for run in (oracle.meta_gradient, finite_differences.meta_objective):
            seen.clear()
            result = run(Recorder(), task, steps, 0.1, query_weights=weights, step_kwarg="num_step")
            if run is finite_differences.meta_objective:
                objective, x0 = result
                objective(x0)
            assert seen == want, (run.__name__, steps, weights)


# --- first-order: the rates' gradient in closed form -------------------------------------------


@pytest.mark.parametrize("weights", [None, [0.5, 0.25, 1.0]])
@pytest.mark.parametrize("per_step", [False, True])
def test_first_order_rate_gradients_in_closed_form(weights, per_step):
    """First-order: φ_{k+1} = φ_k − α_k ⊙ g_k with g_k constant, so λ_{k+1} = Σ_{j>k} w_{j−1}
    ∇L_Q(φ_j) (∇L_Q(φ_K) for the final loss) and ∂F/∂α_k = −λ_{k+1} ⊙ g_k, summed over k for a
    rate without a step dimension; ∂F/∂θ = λ_0 = Σ_j w_{j−1} ∇L_Q(φ_j)."""
    model, task, steps = mlp([2, 3, 1]), regression_task(), 3
    lr = rates_like(model, steps if per_step else None, seed=4)
    got = oracle.meta_gradient(
        model, task, steps, lr, first_order=True, per_step_lr=per_step, query_weights=weights
    )
    names = list(trainable(model))
    (xs, ys), (xq, yq) = task.support, task.query
    phi = {n: p.detach().clone() for n, p in trainable(model).items()}
    inner, query = [], {}  # g_k, and ∇L_Q(φ_j) with its weight
    for k in range(steps):
        at = {n: t.requires_grad_(True) for n, t in phi.items()}
        g = torch.autograd.grad(task.loss(functional_call(model, at, (xs,)), ys), list(at.values()))
        inner.append(dict(zip(names, g)))
        phi = {n: (phi[n] - (lr[n][k] if per_step else lr[n]) * inner[k][n]).detach() for n in names}
        if weights is not None or k == steps - 1:
            at = {n: t.requires_grad_(True) for n, t in phi.items()}
            v = torch.autograd.grad(task.loss(functional_call(model, at, (xq,)), yq), list(at.values()))
            query[k + 1] = (1.0 if weights is None else weights[k], dict(zip(names, v)))
    for n in names:
        adjoint = [sum(w * v[n] for j, (w, v) in query.items() if j > k) for k in range(steps)]
        per_k = torch.stack([-adjoint[k] * inner[k][n] for k in range(steps)])
        want = per_k if per_step else per_k.sum(0)
        torch.testing.assert_close(got[f"inner_lr.{n}"], want, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got[n], sum(w * v[n] for w, v in query.values()), rtol=RTOL, atol=ATOL)


# --- the student and the public signatures -----------------------------------------------------


def test_student_read_without_settings_is_unchanged():
    model = MetaSGDLike()
    student = Student.read(model, "head")
    assert student.schedule is None
    assert list(student.theta) == list(trainable(model))  # the rates are plain parameters here
    assert student.adapted == tuple(n for n in trainable(model) if n.startswith("lrs."))
    assert Student.read(model).adapted == tuple(trainable(model))


def test_the_student_steps_with_rates_given_in_start():
    """A start that gives a rate (its key) overrides the rate read from the model: the objective
    at a doubled rate is the objective of a model whose rate is doubled."""
    model, task = mlp([2, 3, 1]), regression_task()
    alpha = torch.tensor(0.1, dtype=F64, requires_grad=True)
    objective, x0 = finite_differences.meta_objective(model, task, 2, alpha)
    doubled = x0.clone()
    doubled[-1] = 0.2
    want, at = finite_differences.meta_objective(
        model, task, 2, torch.tensor(0.2, dtype=F64, requires_grad=True)
    )
    assert at[-1] == 0.2
    assert objective(doubled) == want(at)
    assert objective(doubled) != objective(x0)


@pytest.mark.parametrize(
    "entry",
    [
        oracle.meta_gradient,
        finite_differences.meta_objective,
        finite_differences.meta_gradient,
        finite_differences.check,
    ],
)
def test_the_new_keywords_are_keyword_only(entry):
    params = inspect.signature(entry).parameters
    for name in ("per_step_lr", "query_weights", "step_kwarg"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name


def test_positional_use_of_a_new_keyword_fails():
    model, task = mlp([2, 3, 1]), regression_task()
    with pytest.raises(TypeError, match="positional"):
        oracle.meta_gradient(model, task, 1, 0.1, None, 1.0, False, "sgd", True)


def test_the_model_is_left_as_it_was():
    model = with_gradients(copy.deepcopy(MetaSGDLike(steps=3)))
    before = model_state(model)
    task = Task(regression_task().support, regression_task().query, F.mse_loss)
    oracle.meta_gradient(model, task, 3, model.inner_lr(), per_step_lr=True, query_weights=[1, 1, 1])
    finite_differences.check(
        oracle.meta_gradient(model, task, 3, model.inner_lr(), per_step_lr=True),
        model,
        task,
        3,
        model.inner_lr(),
        per_step_lr=True,
        directions=2,
    ).assert_close()
    assert_same_state(before, model_state(model))


class SharedRate(nn.Module):
    """One learned rate parameter ``lr`` shared by every parameter of the network."""

    def __init__(self):
        super().__init__()
        self.module = mlp([2, 3, 1])
        self.lr = nn.Parameter(torch.tensor(0.15, dtype=F64))

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("alone", [True, False], ids=["given-alone", "mapping"])
def test_a_model_owned_rate_shared_by_every_parameter_is_one_coordinate(alone):
    model, task = SharedRate(), regression_task()
    names = [f"module.{n}" for n, _ in model.module.named_parameters()]
    lr = model.lr if alone else dict.fromkeys(names, model.lr)
    got, _ = against_differences(model, task, 3, lr)
    assert set(got) == set(trainable(model))
    want = unrolled(model, task, 3, lambda n, k: model.lr, trainable(model), adapted=names)
    compare(got, want).assert_close(RTOL, ATOL)


class LogRate(nn.Module):
    """A network and the logarithm of its inner rate, both parameters of the model."""

    def __init__(self):
        super().__init__()
        self.module = mlp([2, 4, 1])
        self.log_lr = nn.Parameter(torch.tensor(-2.0, dtype=F64))

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize(
    "entry",
    [
        lambda m, t, lr, a: oracle.meta_gradient(m, t, 3, lr, adapt=a),
        lambda m, t, lr, a: finite_differences.meta_gradient(m, t, 3, lr, adapt=a),
        lambda m, t, lr, a: Student.read(m, loop=InnerLoop(3, lr, adapt=a)),
    ],
    ids=["oracle", "finite_differences", "student"],
)
def test_a_rate_computed_from_a_model_parameter_is_refused(entry):
    # α = exp(log_lr) with log_lr a parameter: the oracle's ∂F/∂log_lr would take the path through
    # α (α ∂F/∂α), finite differences' would not (they perturb α and log_lr as two coordinates)
    model, tasks = LogRate(), [regression_task(0), regression_task(1)]
    adapt = [n for n, _ in model.named_parameters() if n.startswith("module.")]
    before = model_state(model)
    with pytest.raises(ValueError, match=r"inner_lr is computed from the model's parameters \['log_lr'\]"):
        entry(model, tasks, model.log_lr.exp(), adapt)
    assert_same_state(before, model_state(model))


def test_a_rate_computed_from_a_tensor_outside_the_model_is_a_coordinate():
    model, task = mlp([2, 4, 1]), regression_task()
    log_lr = torch.tensor(-2.0, dtype=F64, requires_grad=True)
    alpha = log_lr.exp()
    got, _ = against_differences(model, [task, regression_task(1)], 3, alpha)
    assert set(got) == {*trainable(model), "inner_lr"}
    assert log_lr.grad is None
