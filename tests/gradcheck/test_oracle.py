"""The oracle against an independent exact unroll, a closed form, and first-order MAML — also on
a hand-written model that overrides ``parameters()`` (checked against finite differences too, to
their own tolerance rtol 1e-6, atol 1e-9: see test_finite_differences.py).

Agreement is asserted to rtol 1e-10: both sides compute the same float64 quantity by different
sequences of operations, whose rounding differences are ~1e-15 per operation and stay below
1e-12 here (measured); 1e-10 leaves two orders of magnitude of headroom and still fails on any
missing term, which changes the result at the 1e-3 level or more.
"""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gradcheck import Task, compare, finite_differences, optim, oracle
from gradcheck._higher import higher
from tests.helpers import (
    VarsNet,
    assert_same_state,
    conv_bn,
    image_task,
    mlp,
    mlp_problems,
    model_state,
    reference_meta_gradient,
    regression_task,
    with_gradients,
)

RTOL, ATOL = 1e-10, 1e-13


@given(
    problem=mlp_problems(),
    steps=st.integers(1, 8),
    inner_lr=st.floats(0.01, 0.5),
    leap=st.floats(0.05, 1.0),
    adapt=st.sampled_from([None, "head", "body"]),
)
def test_oracle_matches_independent_unroll(problem, steps, inner_lr, leap, adapt):
    model, task = problem
    got = oracle.meta_gradient(model, task, steps, inner_lr, adapt=adapt, leap=leap)
    want = reference_meta_gradient(model, task, steps, inner_lr, adapt=adapt, leap=leap)
    compare(got, want).assert_close(RTOL, ATOL)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("adapt", [None, "head", "body"])
def test_oracle_conv_batchnorm(train, adapt):
    model, task = conv_bn().train(train), image_task()
    got = oracle.meta_gradient(model, task, 3, 0.2, adapt=adapt, leap=0.8)
    want = reference_meta_gradient(model, task, 3, 0.2, adapt=adapt, leap=0.8)
    compare(got, want).assert_close(RTOL, ATOL)


@pytest.mark.parametrize("steps", [0, 1, 2, 5, 10])
@pytest.mark.parametrize(("adapt", "leap"), [(None, 1.0), (None, 0.6), ("weight", 1.0), ("bias", 0.3)])
def test_oracle_closed_form_linear_regression(steps, adapt, leap):
    """MSE on a linear model has a constant Hessian H, so
    g = [(1 − γ) I + γ ((I − α E_A H)ᵀ)^K] v exactly, with v = ∇L_Q(φ_T)."""
    torch.manual_seed(steps)
    d, n, alpha = 3, 8, 0.15
    model = nn.Linear(d, 1).double()
    xs, xq = torch.randn(n, d, dtype=torch.float64), torch.randn(n + 2, d, dtype=torch.float64)
    ys, yq = torch.randn(n, 1, dtype=torch.float64), torch.randn(n + 2, 1, dtype=torch.float64)
    task = Task((xs, ys), (xq, yq), nn.functional.mse_loss)

    def design(x):  # parameters ordered (weight, bias) as in named_parameters()
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)

    zs, zq = design(xs), design(xq)
    hessian = 2 * zs.T @ zs / n
    mask = torch.tensor([adapt in (None, "weight")] * d + [adapt in (None, "bias")], dtype=torch.float64)
    transition = torch.eye(d + 1, dtype=torch.float64) - alpha * mask[:, None] * hessian
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    phi = theta.clone()
    for _ in range(steps):
        phi = phi - alpha * mask * (2 * zs.T @ (zs @ phi - ys[:, 0]) / n)
    phi_t = theta + leap * (phi - theta)
    v = 2 * zq.T @ (zq @ phi_t - yq[:, 0]) / len(zq)
    closed = (1 - leap) * v + leap * torch.linalg.matrix_power(transition.T, steps) @ v

    g = oracle.meta_gradient(model, task, steps, alpha, adapt=adapt, leap=leap)
    got = torch.cat([g["weight"].reshape(-1), g["bias"]])
    torch.testing.assert_close(got, closed, rtol=RTOL, atol=ATOL)


def test_first_order_is_query_gradient_at_the_teacher_and_differs_from_second_order():
    model, task = mlp([2, 6, 1], "tanh"), regression_task()
    first = oracle.meta_gradient(model, task, 4, 0.3, first_order=True, leap=0.7)
    want = reference_meta_gradient(model, task, 4, 0.3, leap=0.7, first_order=True)
    compare(first, want).assert_close(RTOL, ATOL)
    second = oracle.meta_gradient(model, task, 4, 0.3, leap=0.7)
    # a forgotten create_graph turns MAML into first-order MAML: it must not pass for exact
    assert compare(first, second).overall.rel_error > 1e-2
    assert not compare(first, second).ok(rtol=1e-4)


def test_zero_steps_is_the_plain_query_gradient():
    model, task = mlp([2, 4, 1]), regression_task()
    g = oracle.meta_gradient(model, task, 0, 0.1)
    loss = task.query_loss(model)
    want = dict(zip(dict(model.named_parameters()), torch.autograd.grad(loss, list(model.parameters()))))
    compare(g, want).assert_close(RTOL, ATOL)


class PartlyUsed(nn.Module):
    """A frozen embedding, a trainable layer and a trainable layer the loss never reads."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(2, 3).double().requires_grad_(False)
        self.used = nn.Linear(3, 1).double()
        self.unused = nn.Linear(3, 1).double()

    def forward(self, x):
        return self.used(torch.tanh(self.frozen(x)))


def test_every_trainable_parameter_present_zero_where_unused():
    torch.manual_seed(0)
    model, task = PartlyUsed(), regression_task()
    g = oracle.meta_gradient(model, task, 3, 0.2)
    assert list(g) == ["used.weight", "used.bias", "unused.weight", "unused.bias"]
    assert all(torch.count_nonzero(g[n]) == 0 for n in ("unused.weight", "unused.bias"))
    assert all(torch.count_nonzero(g[n]) > 0 for n in ("used.weight", "used.bias"))
    compare(g, reference_meta_gradient(model, task, 3, 0.2)).assert_close(RTOL, ATOL)


def test_float32_model_gives_float32_gradient_close_to_float64():
    model64, task64 = mlp([2, 8, 1]), regression_task()
    model32, task32 = mlp([2, 8, 1]).float(), task64.to(torch.float32)
    g32 = oracle.meta_gradient(model32, task32, 5, 0.2)
    assert all(t.dtype == torch.float32 for t in g32.values())
    # float32 rounding (ε ≈ 1.2e-7) amplified through 5 second-order steps stays far below 1e-4
    compare(g32, oracle.meta_gradient(model64, task64, 5, 0.2)).assert_close(rtol=1e-4, atol=1e-7)


def test_inner_optimizer_adam_differs_from_sgd():
    model, task = mlp([2, 6, 1]), regression_task()
    adam = oracle.meta_gradient(model, task, 3, 0.05, inner_optimizer="adam")
    sgd = oracle.meta_gradient(model, task, 3, 0.05)
    assert compare(adam, sgd).overall.rel_error > 1e-2


def test_bare_higher_cannot_patch_a_model_that_overrides_parameters():
    """Why the oracle wraps the model in a plain root module: ``higher`` enumerates parameters
    with ``module.parameters()`` and loses count on such a model (a bare IndexError)."""
    with pytest.raises(IndexError):
        higher.monkeypatch(VarsNet(), copy_initial_weights=False)


@pytest.mark.parametrize("steps", [1, 3])
def test_oracle_on_a_model_that_overrides_parameters(steps):
    """Every trainable named parameter gets its meta-gradient (the frozen running statistics
    none), equal to the independent flat unroll and to finite differences; the model is left
    as it was although its forward writes the running statistics in place."""
    model, task = with_gradients(VarsNet()), image_task()
    before = model_state(model)
    g = oracle.meta_gradient(model, task, steps, 0.2)
    assert list(g) == [f"vars.{i}" for i in range(6)]
    assert_same_state(before, model_state(model))
    reference = reference_meta_gradient(copy.deepcopy(model), task, steps, 0.2)  # it writes vars_bn
    compare(g, reference).assert_close(RTOL, ATOL)
    compare(finite_differences.meta_gradient(model, task, steps, 0.2), g).assert_close(1e-6, 1e-9)
    twin = oracle.meta_gradient(model.plain(), task, steps, 0.2)
    compare(g, dict(zip(g, twin.values()))).assert_close(RTOL, ATOL)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"inner_optimizer": "adam"},
        {"inner_optimizer": optim.SGD(momentum=0.9, nesterov=True, weight_decay=0.01)},
        {"inner_optimizer": optim.AdamW(weight_decay=0.05)},
        {"inner_optimizer": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5, dampening=0.1)},
        {"first_order": True},
        {"leap": 0.4},
        {"adapt": "head"},
        {"adapt": "body"},
    ],
)
@pytest.mark.parametrize(
    "build", [lambda: (mlp([2, 5, 1]), regression_task()), lambda: (conv_bn(), image_task())]
)
def test_the_hooked_models_unroll_is_the_higher_unroll_on_a_model_without_hooks(build, settings):
    """The functional_call unroll the oracle uses for hooked models, forced on models without
    hooks, against the higher unroll: the same operations, so equal to rounding."""
    from gradcheck.oracle import _task_gradient, _unrolled
    from gradcheck.parameters import resolve_adapt
    from gradcheck.settings import InnerLoop

    model, task = build()
    loop = InnerLoop(3, 0.2, **settings)
    theta = dict(model.named_parameters())
    adapted = resolve_adapt(model, loop.adapt)
    before = model_state(model)
    via_higher = _task_gradient(model, task, loop, theta, adapted)
    model.load_state_dict(before["state_dict"])  # BatchNorm statistics, as they were
    unrolled = _unrolled(model, task, loop, theta, adapted)
    model.load_state_dict(before["state_dict"])
    for a, b in zip(via_higher, unrolled):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
