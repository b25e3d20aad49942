"""SPEC §3–§4 for every public entry point that takes (model, task, steps, inner_lr):

* the model is left exactly as it was — parameters, buffers, ``.grad``, train/eval mode — after
  every call, successful or not;
* every bad input gets an exception that names the problem.

The model has BatchNorm (in train mode unless stated) and gradients already set, so that any
leak of running statistics, mode or ``.grad`` would show.
"""

import pytest
import torch
from torch import nn

import lazymaml
from gradcheck import Task, finite_differences, oracle, validate
from lazymaml import estimators
from tests.gradcheck.implementations import functional_maml
from tests.helpers import assert_same_state, conv_bn, image_task, model_state, with_gradients


def _zeros(model):
    if not isinstance(model, nn.Module):
        return {}
    return {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}


ENTRY_POINTS = {
    "oracle.meta_gradient": oracle.meta_gradient,
    "finite_differences.meta_gradient": finite_differences.meta_gradient,
    "finite_differences.check": lambda m, t, k, lr, **kw: finite_differences.check(
        _zeros(m), m, t, k, lr, **kw
    ),
    "validate": lambda m, t, k, lr, **kw: validate(functional_maml, m, [t], k, lr, **kw),
    "lazymaml.meta_gradient": lazymaml.meta_gradient,
    "lazymaml.deviation_bound": lazymaml.deviation_bound,
    "LazyMAML.meta_backward": lambda m, t, k, lr, **kw: lazymaml.LazyMAML(m, k, lr, **kw).meta_backward([t]),
    "LazyMAML.adapt": lambda m, t, k, lr, **kw: lazymaml.LazyMAML(m, k, lr, **kw).adapt(t),
    "estimators.first_order": estimators.first_order,
    "estimators.reptile": estimators.reptile,
    "estimators.truncated": lambda m, t, k, lr, **kw: estimators.truncated(
        m, t, k, lr, horizon=min(k, 1), **kw
    ),
    "estimators.imaml": lambda m, t, k, lr, **kw: estimators.imaml(m, t, k, lr, lam=10.0, **kw),
}
WRITES_GRAD = {"LazyMAML.meta_backward"}  # by design: it accumulates into p.grad
SUPPORT_ONLY = {"LazyMAML.adapt", "estimators.reptile"}  # never evaluate the query loss


@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e not in WRITES_GRAD])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("adapt", [None, "head"])
def test_model_untouched_after_a_successful_call(entry, train, adapt):
    model = with_gradients(conv_bn().train(train))
    before = model_state(model)
    ENTRY_POINTS[entry](model, image_task(), 2, 0.1, adapt=adapt)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_works_inside_no_grad(entry):
    """Users evaluate under torch.no_grad(); every entry point differentiates anyway."""
    with torch.no_grad():
        ENTRY_POINTS[entry](conv_bn().train(), image_task(), 2, 0.1)


def _bad_at(point, value, x):
    """A task whose support loss is multiplied by ``value`` at the ``point``-th distinct parameter
    point it is evaluated at (1-based: θ, φ_1, φ_2, …), however often each point is evaluated."""
    seen = []

    def support(f):
        out = f(x)
        key = out.sum().item()
        if key not in seen:
            seen.append(key)
        loss = out.logsumexp(1).mean()
        return loss * value if seen.index(key) + 1 == point else loss

    return Task.from_closures(support, lambda f: f(x).logsumexp(1).mean())


X = image_task().support[0]
BAD = [
    # (description, kwargs override, task factory or None, expected exception, message pattern)
    ("negative steps", dict(steps=-1), None, ValueError, r"steps must be >= 0, got -1"),
    ("fractional steps", dict(steps=2.5), None, TypeError, r"steps must be an integer"),
    ("zero inner_lr", dict(inner_lr=0.0), None, ValueError, r"inner_lr must be > 0, got 0.0"),
    ("negative inner_lr", dict(inner_lr=-0.1), None, ValueError, r"inner_lr must be > 0"),
    ("nan inner_lr", dict(inner_lr=float("nan")), None, TypeError, r"inner_lr must be a finite real"),
    ("leap 0", dict(leap=0.0), None, ValueError, r"leap .* must be in \(0, 1\], got 0.0"),
    ("leap above 1", dict(leap=1.5), None, ValueError, r"leap .* must be in \(0, 1\], got 1.5"),
    ("adapt selects nothing", dict(adapt=lambda n: False), None, ValueError, r"selects no trainable"),
    (
        "adapt unknown name",
        dict(adapt=["head.weight"]),
        None,
        ValueError,
        r"unknown parameters \['head.weight'\]",
    ),
    ("adapt wrong type", dict(adapt=[3]), None, TypeError, r"adapt must be None, a preset"),
    (
        "non-scalar support loss",
        {},
        lambda: Task.from_closures(lambda f: f(X).sum(1), lambda f: f(X).sum()),
        ValueError,
        r"support loss L_S\(φ_0\) at inner step 1 of 3 must be a scalar \(0-dim\) tensor, got shape \(6,\)",
    ),
    (
        "non-scalar query loss",
        {},
        lambda: Task.from_closures(lambda f: f(X).sum(), lambda f: f(X)),
        ValueError,
        r"query loss L_Q\(φ_T\) must be a scalar",
    ),
    (
        "loss not a tensor",
        {},
        lambda: Task.from_closures(lambda f: 1.0, lambda f: f(X).sum()),
        TypeError,
        r"support loss .* must be a tensor, got float",
    ),
    (
        "nan at the third inner step",
        {},
        lambda: _bad_at(3, float("nan"), X),
        FloatingPointError,
        r"support loss L_S\(φ_2\) at inner step 3 of 3 is nan",
    ),
    (
        "inf at the second inner step",
        {},
        lambda: _bad_at(2, float("inf"), X),
        FloatingPointError,
        r"inner step 2 of 3 is inf",
    ),
    (
        "nan query loss",
        {},
        lambda: Task.from_closures(lambda f: f(X).pow(2).mean(), lambda f: f(X).sum() * float("nan")),
        FloatingPointError,
        r"query loss L_Q\(φ_T\) is nan",
    ),
]


@pytest.mark.parametrize(
    ("entry", "override", "task", "error", "pattern"),
    [
        pytest.param(entry, *bad[1:], id=f"{bad[0]}-{entry}")
        for entry in ENTRY_POINTS
        for bad in BAD
        if not (entry in SUPPORT_ONLY and "query" in bad[0])
    ],
)
def test_bad_input_raises_clearly_and_leaves_model_untouched(entry, override, task, error, pattern):
    model = with_gradients(conv_bn().train())
    before = model_state(model)
    args = dict(steps=3, inner_lr=0.1) | override
    with pytest.raises(error, match=pattern):
        ENTRY_POINTS[entry](
            model, task() if task else image_task(), args.pop("steps"), args.pop("inner_lr"), **args
        )
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_model_without_trainable_parameters(entry):
    model = conv_bn().requires_grad_(False)
    with pytest.raises(ValueError, match="model has no trainable parameters"):
        ENTRY_POINTS[entry](model, image_task(), 1, 0.1)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_adapt_naming_a_frozen_parameter(entry):
    model = conv_bn()
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"not trainable: \['0.weight'\]"):
        ENTRY_POINTS[entry](model, image_task(), 1, 0.1, adapt=["0.weight"])


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_not_a_module(entry):
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        ENTRY_POINTS[entry](lambda x: x, image_task(), 1, 0.1)


def test_a_closure_that_writes_to_the_real_model_is_undone():
    """Closures get a functional view; one that reaches for the real model anyway (running its
    BatchNorm in train mode, switching it to eval, writing .grad) and then fails is undone."""
    model = with_gradients(conv_bn().train())
    before = model_state(model)

    def rogue(f):
        model(X).sum().backward()
        model.eval()
        raise KeyError("rogue closure")

    with pytest.raises(KeyError, match="rogue closure"):
        oracle.meta_gradient(model, Task.from_closures(rogue, rogue), 2, 0.1)
    assert_same_state(before, model_state(model))


def test_straight_through_needs_every_trainable_parameter():
    model, task = conv_bn(), image_task()
    teacher = {n: p.detach() for n, p in model.named_parameters() if n != "4.bias"}
    with pytest.raises(ValueError, match=r"missing \['4.bias'\]"):
        lazymaml.straight_through(model, task, 1, 0.1, teacher=teacher)


def test_task_construction_errors():
    x, y = X, torch.zeros(6, dtype=torch.long)
    with pytest.raises(TypeError, match=r"Task support must be a pair \(inputs, targets\)"):
        Task(x, (x, y), nn.functional.cross_entropy)
    with pytest.raises(TypeError, match="Task query must hold tensors"):
        Task((x, y), (x, [1, 2]), nn.functional.cross_entropy)
    with pytest.raises(TypeError, match="Task loss must be callable"):
        Task((x, y), (x, y), "cross_entropy")
    with pytest.raises(TypeError, match="query_loss must be callable"):
        Task.from_closures(lambda f: f(x).sum(), None)
    with pytest.raises(TypeError, match="closure task cannot be converted"):
        Task.from_closures(lambda f: f(x).sum(), lambda f: f(x).sum()).to(torch.float64)
