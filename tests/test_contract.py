"""What every public entry point that takes (model, task, steps, inner_lr) promises its caller:

* the model is left exactly as it was — every parameter (trainable or frozen), buffer, ``.grad``,
  ``requires_grad`` and train/eval mode, compared by value — after every call, successful or
  not; a learner's ``meta_backward`` writes only the trainable parameters' ``.grad``, adding
  exactly its estimate;
* every bad input gets an exception that names the problem;
* under ``torch.no_grad()`` every entry point computes exactly what it computes outside it;
* a model that overrides ``parameters()`` (``tests.helpers.VarsNet``) gets from every entry point
  what an ordinary model with the same tensors gets.

Two models, both with gradients already set: conv + BatchNorm (train mode unless stated), and
``stats_net`` (tests.helpers), which keeps BatchNorm-like statistics as frozen parameters *and*
as buffers and writes both in place in forward, through ``.data`` (no version-counter bump).
Any leak of statistics, mode or ``.grad`` shows.

Tolerances: results under ``torch.no_grad()`` are compared for exact equality (the same
operations run); the learners' accumulated estimate and the twin model's results to rtol 1e-10,
atol 1e-13 (the same float64 quantity by different operations, as in test_oracle.py).
"""

from collections.abc import Mapping

import pytest
import torch
from torch import nn
from torch.func import functional_call

import lazymaml
from gradcheck import Task, diagnose, finite_differences, optim, oracle, validate
from gradcheck.validate import Validation
from lazymaml import MetaLearner, estimators
from tests.helpers import (
    VarsNet,
    assert_same_state,
    conv_bn,
    image_task,
    model_state,
    stats_net,
    stats_task,
    with_gradients,
)

# the learners say when a model or a meta-batch runs task by task; expected here
pytestmark = pytest.mark.filterwarnings("ignore::lazymaml.SequentialFallback")

RTOL, ATOL = 1e-10, 1e-13
MODELS = {"conv+BatchNorm": (conv_bn, image_task), "statistics in frozen parameters": (stats_net, stats_task)}
OPTIONS = {"truncated": dict(horizon=1), "imaml": dict(lam=10.0, cg_iterations=100)}  # per estimator


def _zeros(model):
    if not isinstance(model, nn.Module):
        return {}
    return {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}


def _maml(model, task, steps, inner_lr):
    """A validate candidate: MAML by ``torch.func`` on the trainable parameters, reading the frozen
    ones and the buffers from the model itself — so a forward that writes them writes the model,
    and validate must report and undo it."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def at(phi):
        return lambda x: functional_call(model, phi, (x,))

    phi = params
    for _ in range(steps):
        grads = torch.autograd.grad(task.support_loss(at(phi)), list(phi.values()), create_graph=True)
        phi = {n: p - inner_lr * g for (n, p), g in zip(phi.items(), grads)}
    return dict(zip(params, torch.autograd.grad(task.query_loss(at(phi)), list(params.values()))))


def _straight_through(m, t, k, lr, **kw):
    """ψ, and the query loss evaluated at it: evaluating ψ must not write the model either."""
    return t.query_loss(lazymaml.straight_through(m, t, k, lr, **kw))


def _estimator(name):
    fn = estimators.as_function(name)
    return lambda m, t, k, lr, **kw: fn(m, t, k, lr, **OPTIONS.get(name, {}), **kw)


def _learner(estimator, method):
    def call(m, t, k, lr, **kw):
        learner = MetaLearner(m, k, lr, estimator=estimator, **OPTIONS.get(estimator, {}), **kw)
        return learner.meta_backward([t]) if method == "meta_backward" else learner.adapt(t)

    return call


ENTRY_POINTS = {
    "oracle.meta_gradient": oracle.meta_gradient,
    "finite_differences.meta_gradient": finite_differences.meta_gradient,
    "finite_differences.check": lambda m, t, k, lr, **kw: finite_differences.check(
        _zeros(m), m, t, k, lr, **kw
    ),
    "validate": lambda m, t, k, lr, **kw: validate(_maml, m, [t], k, lr, **kw),
    "lazymaml.meta_gradient": lazymaml.meta_gradient,
    "lazymaml.straight_through": _straight_through,
    "lazymaml.deviation_bound": lazymaml.deviation_bound,
    **{
        f"estimators.{name}": _estimator(name)
        for name in estimators.REGISTRY
        if name != "lazy"  # "lazy" is lazymaml.meta_gradient, above
    },
    **{f"MetaLearner({e}).meta_backward": _learner(e, "meta_backward") for e in estimators.REGISTRY},
    "LazyMAML.meta_backward": lambda m, t, k, lr, **kw: lazymaml.LazyMAML(m, k, lr, **kw).meta_backward([t]),
    "LazyMAML.adapt": lambda m, t, k, lr, **kw: lazymaml.LazyMAML(m, k, lr, **kw).adapt(t),
    "MetaLearner(imaml).adapt": _learner("imaml", "adapt"),  # the proximal student
}
WRITES_GRAD = {e for e in ENTRY_POINTS if e.endswith(".meta_backward")}  # by design: into p.grad
SUPPORT_ONLY = {"LazyMAML.adapt", "MetaLearner(imaml).adapt", "estimators.reptile"}  # never read L_Q
QUERY_UNCHECKED = {*SUPPORT_ONLY, "lazymaml.straight_through"}  # ψ is returned; the caller scores it

# what the learners accumulate into p.grad, computed by the functional entry points
LEARNED = {
    "maml": oracle.meta_gradient,
    "lazy": lazymaml.meta_gradient,
    **{name: _estimator(name) for name in estimators.REGISTRY if name not in ("lazy", "maml")},
}


@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e not in WRITES_GRAD])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("adapt", [None, "head"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_model_untouched_after_a_successful_call(entry, train, adapt, model_name):
    build, task = MODELS[model_name]
    model = with_gradients(build().train(train))
    before = model_state(model)
    ENTRY_POINTS[entry](model, task(), 2, 0.1, adapt=adapt)
    assert_same_state(before, model_state(model))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("estimator", list(estimators.REGISTRY))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_meta_backward_only_adds_its_estimate_to_the_trainable_gradients(estimator, model_name):
    build, task = MODELS[model_name]
    model, tasks = with_gradients(build().train()), [task(0), task(1)]
    before, grads = model_state(model), _grads(model)
    loss = MetaLearner(model, 2, 0.1, estimator=estimator, **OPTIONS.get(estimator, {})).meta_backward(tasks)
    assert loss.ndim == 0 and not loss.requires_grad
    estimate = LEARNED[estimator](build().train(), tasks, 2, 0.1)
    after = _grads(model)
    assert after.keys() == grads.keys()
    for name, grad in after.items():
        if name in estimate:  # trainable: exactly the estimate added
            torch.testing.assert_close(grad - grads[name], estimate[name], rtol=RTOL, atol=ATOL)
        else:  # frozen parameters' .grad untouched
            assert torch.equal(grad, grads[name]), name
    before["grads"] = {n: model.get_parameter(n).grad for n in before["grads"]}
    assert_same_state(before, model_state(model))  # everything else as it was


def _values(result, model):
    """What an entry point computed, as comparable values, and the gradients it left on the model."""
    if isinstance(result, Mapping):
        out = list(result.items())
    elif isinstance(result, finite_differences.DirectionalReport):
        out = [(d.analytic, d.numerical, d.numerical_error, d.step) for d in result.directions]
    elif isinstance(result, Validation):
        rows = (*result.overall.rows, result.overall.overall)
        out = [
            (r.name, r.cosine, r.abs_error, r.max_abs_error, r.candidate_norm, r.reference_norm) for r in rows
        ]
    elif isinstance(result, nn.Module):
        out = list(result.state_dict().items())
    else:  # a float (the bound) or a scalar tensor (a loss)
        out = [result]
    return [*out, *((n, p.grad) for n, p in model.named_parameters())]


def _assert_same(a, b, where="result"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where}: {a} != {b}"
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_works_inside_no_grad(entry):
    """Users evaluate under torch.no_grad(); every entry point differentiates anyway, and computes
    exactly the same values as outside it."""
    outside_model = conv_bn().train()
    outside = _values(ENTRY_POINTS[entry](outside_model, image_task(), 2, 0.1), outside_model)
    inside_model = conv_bn().train()
    with torch.no_grad():
        inside = _values(ENTRY_POINTS[entry](inside_model, image_task(), 2, 0.1), inside_model)
    _assert_same(inside, outside)


def _comparable(result):
    """The numbers of a result, in the same order for the VarsNet and for its plain twin."""
    if isinstance(result, finite_differences.DirectionalReport):
        return [(d.analytic, d.numerical) for d in result.directions]
    if isinstance(result, Mapping):
        return list(result.values())
    if isinstance(result, VarsNet):
        return [t.detach() for t in (*result.vars, *result.vars_bn)]
    if isinstance(result, nn.Module):  # the twin: conv, BatchNorm, tanh, flatten, linear
        conv, bn, head = result[0], result[1], result[4]
        tensors = [
            conv.weight,
            conv.bias,
            bn.weight,
            bn.bias,
            head.weight,
            head.bias,
            bn.running_mean,
            bn.running_var,
        ]
        return [t.detach() for t in tensors]
    return result


@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e != "validate"])
def test_a_model_that_overrides_parameters_gets_what_its_plain_twin_gets(entry):
    """Every trainable named parameter of the hand-written model gets the value its ordinary twin
    gets, and the model is left as it was (its forward writes the statistics in ``vars_bn``)."""
    model, task = with_gradients(VarsNet()), image_task()
    twin = with_gradients(model.plain())
    before = model_state(model)
    got = ENTRY_POINTS[entry](model, task, 2, 0.1)
    want = ENTRY_POINTS[entry](twin, task, 2, 0.1)
    if isinstance(got, Mapping):
        assert list(got) == [f"vars.{i}" for i in range(6)]
    torch.testing.assert_close(_comparable(got), _comparable(want), rtol=RTOL, atol=ATOL)
    if entry in WRITES_GRAD:
        grads = [p.grad for p in model.vars]
        torch.testing.assert_close(grads, [p.grad for p in twin.parameters()], rtol=RTOL, atol=ATOL)
        before["grads"] = {n: model.get_parameter(n).grad for n in before["grads"]}
    assert_same_state(before, model_state(model))


def test_validate_a_hand_written_maml_on_a_model_that_overrides_parameters():
    """The popular learner's own MAML (fast weights passed as ``vars=``) is exact; its forward
    writes the running statistics kept in ``vars_bn``, which validate reports and undoes."""

    def vars_maml(model, task, steps, inner_lr):
        (xs, ys), (xq, yq) = task.support, task.query
        fast = list(model.parameters())  # the override: model.vars
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(xs, vars=fast), ys)
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [w - inner_lr * g for w, g in zip(fast, grads)]
        loss = nn.functional.cross_entropy(model(xq, vars=fast), yq)
        return dict(zip([f"vars.{i}" for i in range(6)], torch.autograd.grad(loss, list(model.parameters()))))

    model = with_gradients(VarsNet())
    before = model_state(model)
    validation = validate(vars_maml, model, [image_task(0), image_task(1)], 2, 0.1)
    assert validation.gradient_ok(RTOL, ATOL), str(validation)
    assert {s.name for s in validation.side_effects} == {"vars_bn.0", "vars_bn.1"}
    assert_same_state(before, model_state(model))


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


BAD = [
    # (description, kwargs override, task factory of the inputs x or None, exception, message pattern)
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
        lambda x: Task.from_closures(lambda f: f(x).sum(1), lambda f: f(x).sum()),
        ValueError,
        r"support loss L_S\(φ_0\) at inner step 1 of 3 must be a scalar \(0-dim\) tensor, got shape \(\d+,\)",
    ),
    (
        "non-scalar query loss",
        {},
        lambda x: Task.from_closures(lambda f: f(x).sum(), lambda f: f(x)),
        ValueError,
        r"query loss L_Q\(φ_T\) must be a scalar",
    ),
    (
        "loss not a tensor",
        {},
        lambda x: Task.from_closures(lambda f: 1.0, lambda f: f(x).sum()),
        TypeError,
        r"support loss .* must be a tensor, got float",
    ),
    (
        "nan at the third inner step",
        {},
        lambda x: _bad_at(3, float("nan"), x),
        FloatingPointError,
        r"support loss L_S\(φ_2\) at inner step 3 of 3 is nan",
    ),
    (
        "inf at the second inner step",
        {},
        lambda x: _bad_at(2, float("inf"), x),
        FloatingPointError,
        r"inner step 2 of 3 is inf",
    ),
    (
        "nan query loss",
        {},
        lambda x: Task.from_closures(lambda f: f(x).pow(2).mean(), lambda f: f(x).sum() * float("nan")),
        FloatingPointError,
        r"query loss L_Q\(φ_T\) is nan",
    ),
]
# raised after every support forward has run (and written stats_net's statistics); _bad_at tells
# parameter points apart by the output, which stats_net's statistics change from call to call
LATE = {"non-scalar query loss", "nan query loss"}


@pytest.mark.parametrize(
    ("model_name", "entry", "override", "task", "error", "pattern"),
    [
        pytest.param(model_name, entry, *bad[1:], id=f"{bad[0]}-{entry}-{model_name}")
        for model_name in MODELS
        for entry in ENTRY_POINTS
        for bad in BAD
        if not (entry in QUERY_UNCHECKED and "query" in bad[0])
        and (model_name == "conv+BatchNorm" or bad[0] in LATE)
    ],
)
def test_bad_input_raises_clearly_and_leaves_model_untouched(
    model_name, entry, override, task, error, pattern
):
    build, data = MODELS[model_name]
    model = with_gradients(build().train())
    before = model_state(model)
    args = dict(steps=3, inner_lr=0.1) | override
    with pytest.raises(error, match=pattern):
        ENTRY_POINTS[entry](
            model,
            task(data().support[0]) if task else data(),
            args.pop("steps"),
            args.pop("inner_lr"),
            **args,
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


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_a_closure_that_writes_to_the_real_model_is_undone(entry, model_name):
    """Closures get a functional view; one that reaches for the real model anyway (running its
    forward in train mode, which writes statistics, switching it to eval, writing .grad) and then
    fails is undone by every entry point."""
    build, data = MODELS[model_name]
    model, x = with_gradients(build().train()), data().support[0]
    before = model_state(model)

    def rogue(f):
        model(x).sum().backward()
        model.eval()
        raise KeyError("rogue closure")

    with pytest.raises(KeyError, match="rogue closure"):
        ENTRY_POINTS[entry](model, Task.from_closures(rogue, rogue), 2, 0.1)
    assert_same_state(before, model_state(model))


# --- learned inner rates, a multi-step loss, a step index: refused clearly, model untouched ---


def _rates(model, shape=None, value=0.1, dtype=torch.float64, lead=()):
    """One learned rate per adapted parameter: of the parameter's shape, or of ``shape``."""
    return {
        n: torch.full(lead + (p.shape if shape is None else shape), value, dtype=dtype, requires_grad=True)
        for n, p in model.named_parameters()
    }


def _one_for_two(model):
    shared = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    return dict(inner_lr={n: shared for n, _ in model.named_parameters()})


def _owned_in_adapt(model):
    """The rate of ``0.bias`` is the model's own ``1.weight`` (in [0.5, 1.5]), which adapt names."""
    rate = torch.full((3,), 0.1, dtype=torch.float64)
    return dict(inner_lr={"0.bias": model[1].weight, "1.weight": rate}, adapt=["0.bias", "1.weight"])


def _with_nan(model):
    lr = _rates(model)
    with torch.no_grad():
        lr["4.bias"][1] = float("nan")  # one entry of three
    return dict(inner_lr=lr)


def _with_negative(model):
    lr = _rates(model)
    with torch.no_grad():
        lr["1.weight"][1] = -0.05
    return dict(inner_lr=lr)


def _scalar(model):
    return torch.tensor(0.1, dtype=torch.float64, requires_grad=True)


RATE_BAD = [
    # (description, kwargs from the model, takes a new keyword, exception, message pattern)
    (
        "rate of the wrong shape",
        lambda m: dict(inner_lr=_rates(m, shape=(2,))),
        False,
        ValueError,
        r"inner_lr\['0.weight'\] has shape \(2,\); expected \(\) or the parameter's \(3, 1, 3, 3\)",
    ),
    ("negative rate", _with_negative, False, ValueError, r"inner_lr\['1.weight'\] has a negative rate"),
    ("non-finite rate", _with_nan, False, ValueError, r"inner_lr\['4.bias'\] must be finite"),
    (
        "rate on another dtype",
        lambda m: dict(inner_lr=_rates(m, dtype=torch.float32)),
        False,
        ValueError,
        r"inner_lr\['0.weight'\] is torch.float32 on cpu, its parameter '0.weight' torch.float64",
    ),
    (
        "integer rate",
        lambda m: dict(inner_lr=torch.tensor(1)),
        False,
        TypeError,
        r"inner_lr must be a floating-point tensor, got torch.int64",
    ),
    (
        "mapping missing an adapted parameter",
        lambda m: dict(inner_lr={n: t for n, t in _rates(m).items() if n != "4.bias"}),
        False,
        ValueError,
        r"inner_lr has no rate for adapted parameters \['4.bias'\]",
    ),
    (
        "mapping naming a parameter not adapted",
        lambda m: dict(inner_lr=_rates(m), adapt=["4.weight", "4.bias"]),
        False,
        ValueError,
        r"inner_lr has rates for \['0.bias', '0.weight', '1.bias', '1.weight'\], which the inner loop "
        "does not adapt",
    ),
    ("empty mapping", lambda m: dict(inner_lr={}), False, ValueError, r"inner_lr is an empty mapping"),
    (
        "model-owned rate in adapt",
        _owned_in_adapt,
        False,
        ValueError,
        r"parameters \['1.weight'\] are inner learning rates: exclude them from adapt",
    ),
    (
        "one learned tensor for two parameters",
        _one_for_two,
        False,
        ValueError,
        r"inner_lr gives one learned tensor to the parameters \['0.weight', '0.bias', ",
    ),
    (
        "learned rates with adam",
        lambda m: dict(inner_lr=_scalar(m), inner_optimizer="adam"),
        False,
        ValueError,
        r"learned inner rates .* step plain SGD, φ − α ⊙ g; they do not combine with inner_optimizer='adam'",
    ),
    (
        "learned rates with momentum",
        lambda m: dict(inner_lr=_rates(m), inner_optimizer=optim.SGD(momentum=0.9)),
        False,
        ValueError,
        r"step plain SGD.* inner_optimizer=SGD\(",
    ),
    (
        "per-step rates with a wrong S",
        lambda m: dict(inner_lr=_rates(m, lead=(5,)), per_step_lr=True),
        True,
        ValueError,
        r"inner_lr\['0.weight'\] has 5 steps in its leading dimension; the inner loop runs 3 \(give 3, or 4",
    ),
    (
        "per-step rate without a step dimension",
        lambda m: dict(inner_lr=_scalar(m), per_step_lr=True),
        True,
        ValueError,
        r"inner_lr has no step dimension, but per_step_lr=True",
    ),
    (
        "per_step_lr with a float",
        lambda m: dict(per_step_lr=True),
        True,
        ValueError,
        r"per_step_lr=True needs rates with a leading step dimension, not a float inner_lr",
    ),
    (
        "query_weights of the wrong length",
        lambda m: dict(query_weights=[1.0, 1.0]),
        True,
        ValueError,
        r"query_weights must have one weight per inner step \(steps=3\), got 2",
    ),
    (
        "query_weights with a leap",
        lambda m: dict(query_weights=[1.0, 1.0, 1.0], leap=0.5),
        True,
        ValueError,
        r"query_weights \(a multi-step loss\) and a leap γ != 1 do not combine",
    ),
    (
        "query_weights with K=0",
        lambda m: dict(query_weights=[], steps=0),
        True,
        ValueError,
        r"query_weights \(a multi-step loss\) needs steps >= 1",
    ),
    (
        "non-finite query_weights",
        lambda m: dict(query_weights=[1.0, float("inf"), 1.0]),
        True,
        TypeError,
        r"query_weights entry must be a finite real number, got inf",
    ),
    (
        "query_weights not a sequence",
        lambda m: dict(query_weights=1.0),
        True,
        TypeError,
        r"query_weights must be a sequence of K floats",
    ),
    (
        "step_kwarg not an identifier",
        lambda m: dict(step_kwarg="num step"),
        True,
        TypeError,
        r"step_kwarg must be a keyword name \(e.g. 'num_step'\), got 'num step'",
    ),
]
RATE_ENTRIES = {
    "oracle.meta_gradient": oracle.meta_gradient,
    "finite_differences.meta_objective": finite_differences.meta_objective,
    "finite_differences.meta_gradient": finite_differences.meta_gradient,
    "finite_differences.check": ENTRY_POINTS["finite_differences.check"],
    "validate": ENTRY_POINTS["validate"],
    "diagnose": lambda m, t, k, lr, **kw: diagnose(_zeros(m), m, [t], k, lr, **kw),
}
NO_NEW_KEYWORDS = {"validate", "diagnose"}  # they take inner_lr; not yet the three new keywords


@pytest.mark.parametrize(
    ("entry", "make", "error", "pattern"),
    [
        pytest.param(entry, bad[1], *bad[3:], id=f"{bad[0]}-{entry}")
        for entry in RATE_ENTRIES
        for bad in RATE_BAD
        if not (bad[2] and entry in NO_NEW_KEYWORDS)
    ],
)
def test_bad_rates_and_multi_step_settings_are_refused_clearly_and_leave_the_model_untouched(
    entry, make, error, pattern
):
    model = with_gradients(conv_bn().train())
    before = model_state(model)
    args = dict(steps=3, inner_lr=0.1) | make(model)
    with pytest.raises(error, match=pattern):
        RATE_ENTRIES[entry](model, image_task(), args.pop("steps"), args.pop("inner_lr"), **args)
    assert_same_state(before, model_state(model))
