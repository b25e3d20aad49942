"""Learned inner rates, a multi-step loss and a step index in the estimators "maml", "first_order"
and "lazy" (and the learner that trains with them).

Every exactness claim is checked in float64 against computations written here, sharing no code
with lazymaml: an autograd unroll over ``torch.func.functional_call`` (exact and first-order MAML),
the lazy estimator's own definition by ``torch.func`` transforms (K > 1), coordinate-wise finite
differences, and the oracle. Tolerances: identities between float64 computations of one
quantity are asserted to rtol 1e-10, atol 1e-13 (rounding measured below 1e-15, the inner loop
amplifying it at most to ~1e-12: gradcheck.tolerances); finite differences to
gradcheck.tolerances.COORDINATEWISE.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad

import lazymaml
from gradcheck import finite_differences, oracle
from gradcheck.parameters import resolve_adapt
from gradcheck.settings import InnerLoop
from gradcheck.tolerances import COORDINATEWISE
from lazymaml import estimators
from tests.helpers import F64, assert_same_state, mlp, model_state, regression_task, with_gradients

RTOL, ATOL = 1e-10, 1e-13


class MetaSGD(nn.Module):
    """learn2learn's layout: the network under ``module``, one learned rate per entry in ``lrs``."""

    def __init__(self, module: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.module = module
        self.lrs = nn.ParameterList([nn.Parameter(torch.full_like(p, lr)) for p in module.parameters()])

    def forward(self, x):
        return self.module(x)

    def rates(self):
        return {f"module.{n}": r for (n, _), r in zip(self.module.named_parameters(), self.lrs)}


class Indexed(nn.Module):
    """A model told the inner step (MAML++'s ``forward(x, num_step=k)``): a per-step shift of the
    hidden layer, so the gradient depends on which index each loss sees."""

    def __init__(self, steps: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Linear(2, 4).to(F64), nn.Linear(4, 1).to(F64)
        self.shift = nn.Parameter(torch.randn(steps + 1, 4, dtype=F64))

    def forward(self, x, num_step=0):
        return self.out(torch.tanh(self.inp(x) + self.shift[num_step]))


def rates_for(model, kind, steps, seed=0):
    """(inner_lr, per_step_lr, {adapted name: key of its rate}) for a rate layout; keys as the
    oracle keys them, written out here."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, p in model.named_parameters() if not n.startswith("lrs.")]
    shapes = {n: model.get_parameter(n).shape for n in names}

    def draw(*shape):
        return (0.05 + 0.1 * torch.rand(shape, generator=g, dtype=F64)).requires_grad_()

    if kind == "float":
        return 0.1, False, {}
    if kind == "scalar":
        return draw(), False, {n: "inner_lr" for n in names}
    if kind == "per_layer":
        return {n: draw() for n in names}, False, {n: f"inner_lr.{n}" for n in names}
    if kind == "meta_sgd":
        return {n: draw(*shapes[n]) for n in names}, False, {n: f"inner_lr.{n}" for n in names}
    if kind == "lslr":  # MAML++: K + 1 per-step, per-layer rates
        return {n: draw(steps + 1) for n in names}, True, {n: f"inner_lr.{n}" for n in names}
    if kind == "per_step_entry":
        return {n: draw(steps, *shapes[n]) for n in names}, True, {n: f"inner_lr.{n}" for n in names}
    if kind == "owned":  # the rates are parameters of the model (MetaSGD.lrs)
        return model.rates(), False, {n: f"lrs.{i}" for i, n in enumerate(names)}
    raise ValueError(kind)


def _rate_tensors(model, inner_lr, keys):
    """{key: the rate tensor} (a learned rate that is a model parameter under its own name)."""
    params = dict(model.named_parameters())
    out = {}
    for n, key in keys.items():
        out[key] = params[key] if key in params else (inner_lr if key == "inner_lr" else inner_lr[n])
    return out


def _rate(values, keys, fixed, n, k, per_step):
    t = values[keys[n]] if n in keys else fixed
    return t[k] if per_step else t


def reference(model, task, steps, inner_lr, per_step, keys, weights=None, kwarg=None, leap=1.0, first=False):
    """{coordinate: ∂F/∂coordinate} by an autograd unroll over functional_call (SGD with the rates),
    F = L_Q(θ + γ(φ_K − θ)) or Σ_k w_k L_Q(φ_{k+1}); ``first`` holds the inner gradients constant."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    rates = {  # a model-owned rate is differentiated as the parameter it is
        key: t.detach().clone().requires_grad_()
        for key, t in _rate_tensors(model, inner_lr, keys).items()
        if key not in params
    }
    values = {**params, **rates}
    adapted = [n for n in params if not n.startswith("lrs.")]
    buffers = dict(model.named_buffers())

    def f(point, index):
        extra = {} if kwarg is None else {kwarg: index}
        return lambda x: functional_call(model, {**point, **buffers}, (x,), extra)

    phi, total = dict(params), 0.0
    for k in range(steps):
        loss = task.support_loss(f(phi, k))
        gs = torch.autograd.grad(loss, [phi[n] for n in adapted], create_graph=not first)
        phi = dict(phi)
        for n, gn in zip(adapted, gs):
            fixed = inner_lr if not keys else None
            phi[n] = phi[n] - _rate(values, keys, fixed, n, k, per_step) * (gn.detach() if first else gn)
        if weights is not None:
            total = total + weights[k] * task.query_loss(f(phi, k))
    if weights is None:
        end = {n: p + leap * (phi[n] - p) for n, p in params.items()}
        total = task.query_loss(f(end, max(steps - 1, 0)))
    coordinates = {**params, **rates}
    gs = torch.autograd.grad(total, list(coordinates.values()), allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(coordinates.items(), gs)}


def lazy_definition(
    model, task, steps, inner_lr, per_step, keys, eta="single", weights=None, leap=1.0, kwarg=None
):
    """The lazy estimator from its definition, by torch.func: the student's trajectory
    φ_{k+1} = φ_k − α_k ⊙ g_k (g_k = ∇_A L_S(φ_k)); v_j = ∇L_Q(φ_j) at the scored points; θ gets
    Σ_j w_j v_j − ∇_θ⟨∇_A L_S(θ), Σ_j w_j η_j ⊙ v_j⟩ with η_j = γα_0 ("single"), γ(α_0 + … +
    α_{j−1}) ("horizon") or a float; a rate α_k gets −Λ_{k+1} ⊙ g_k, Λ_{k+1} = Σ_{j>k} w_j v_j
    (γv at φ_T), summed over what it is shared by. ``kwarg``: step k's support loss (and the HVP's,
    at θ: step 0's) sees k, the query at φ_j sees j − 1."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    values = {**params, **{k: t.detach() for k, t in _rate_tensors(model, inner_lr, keys).items()}}
    adapted = [n for n in params if not n.startswith("lrs.")]

    def told(index):
        return {} if kwarg is None else {kwarg: index}

    def support(point, index):
        return task.support_loss(lambda x: functional_call(model, point, (x,), told(index)))

    def query(point, index):
        return task.query_loss(lambda x: functional_call(model, point, (x,), told(index)))

    def grad_adapted(point, index):
        return grad(lambda a: support({**point, **a}, index))({n: point[n] for n in adapted})

    def alpha(n, k):
        return _rate(values, keys, inner_lr, n, k, per_step)

    scored = {steps: 1.0} if weights is None else {k + 1: w for k, w in enumerate(weights)}
    phi, gs, vs = dict(params), [], {}
    for k in range(steps):
        g = grad_adapted(phi, k)
        gs.append(g)
        phi = {**phi, **{n: phi[n] - alpha(n, k) * g[n] for n in adapted}}
        if k + 1 in scored and k + 1 != steps:
            vs[k + 1] = grad(query)(phi, k)
    vs[steps] = grad(query)({n: p + leap * (phi[n] - p) for n, p in params.items()}, max(steps - 1, 0))

    def step_size(n, j):
        if not isinstance(eta, str):
            return eta
        ks = range(j) if eta == "horizon" else [0]
        return leap * sum(alpha(n, k) for k in ks)

    total_v = {n: sum(w * vs[j][n] for j, w in scored.items()) for n in params}
    along = {n: sum(w * step_size(n, j) * vs[j][n] for j, w in scored.items()) for n in adapted}
    hvp = grad(lambda p: sum((grad_adapted(p, 0)[n] * along[n]).sum() for n in adapted))(params)
    out = {n: total_v[n] - hvp[n] for n in params}
    for n, key in keys.items():
        shape = values[key].shape
        r = out[key] if key in out else torch.zeros(shape, dtype=F64)
        r = r.clone()
        for k in range(steps):
            adjoint = sum(w * (leap if j == steps else 1.0) * vs[j][n] for j, w in scored.items() if j > k)
            c = -adjoint * gs[k][n]
            slot_shape = shape[1:] if per_step else shape
            c = c.sum() if len(slot_shape) == 0 else c
            if per_step:
                r[k] += c
            else:
                r += c
        out[key] = r
    return out


def assert_same_gradient(got, want):
    assert list(got) == list(want), (list(got), list(want))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")


def _problem(kind, steps, indexed=False, seed=0):
    if kind == "owned":
        model = MetaSGD(mlp([2, 4, 1], seed=seed))
    elif indexed:
        model = Indexed(steps, seed)
    else:
        model = mlp([2, 4, 1], seed=seed)
    return model, regression_task(seed, shots=5, queries=6)


KINDS = ["float", "scalar", "per_layer", "meta_sgd", "lslr", "per_step_entry", "owned"]


def _loop(steps, inner_lr, per_step, weights=None, kwarg=None, **kw):
    return InnerLoop(steps, inner_lr, per_step_lr=per_step, query_weights=weights, step_kwarg=kwarg, **kw)


@pytest.mark.parametrize(
    ("kind", "indexed"),
    [(k, i) for k in KINDS for i in (False, True) if not (k == "owned" and i)],  # MetaSGD takes no index
)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_maml_and_first_order_equal_the_oracle_and_an_independent_unroll(kind, indexed, steps, weighted):
    model, task = _problem(kind, steps, indexed)
    inner_lr, per_step, keys = rates_for(model, kind, steps)
    weights = tuple(0.5 + 0.25 * k for k in range(steps)) if weighted else None
    kwarg = "num_step" if indexed else None
    loop = _loop(steps, inner_lr, per_step, weights, kwarg)
    before = model_state(model)
    for first in (False, True):
        got = estimators.run("first_order" if first else "maml", model, task, loop)
        assert_same_gradient(got, oracle.gradient(model, task, loop.replace(first_order=first)))
        want = reference(model, task, steps, inner_lr, per_step, keys, weights, kwarg, first=first)
        assert_same_gradient(got, want)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("kind", ["scalar", "lslr", "owned"])
def test_maml_with_rates_passes_finite_differences(kind):
    model, task = _problem(kind, 3, indexed=kind == "lslr")
    inner_lr, per_step, _ = rates_for(model, kind, 3)
    settings = dict(per_step_lr=per_step, query_weights=(0.2, 0.3, 1.0) if kind == "lslr" else None)
    if kind == "lslr":
        settings["step_kwarg"] = "num_step"
    got = estimators.maml(model, task, 3, inner_lr, **settings)
    numeric = finite_differences.meta_gradient(model, task, 3, inner_lr, **settings)
    rtol, atol = COORDINATEWISE
    assert list(got) == list(numeric)
    for n in got:
        torch.testing.assert_close(got[n], numeric[n], rtol=rtol, atol=atol)


@given(
    kind=st.sampled_from(KINDS),
    adapt=st.sampled_from([None, "head", "body"]),
    leap=st.sampled_from([1.0, 0.6]),
    weight=st.sampled_from([None, 0.7]),
    indexed=st.booleans(),
    seed=st.integers(0, 3),
)
def test_lazy_at_one_step_is_exact_maml_weights_and_rates(kind, adapt, leap, weight, indexed, seed):
    """The K = 1 identity with learned rates: γα_0 ⊙ in the one-step Jacobian, −γ v ⊙ g_0 for α_0."""
    indexed = indexed and kind != "owned"
    adapt = None if kind == "owned" else adapt  # MetaSGD's adapted set is the default (its rates excluded)
    model, task = _problem(kind, 1, indexed, seed)
    inner_lr, per_step, _ = rates_for(model, kind, 1, seed)
    if isinstance(inner_lr, dict):
        inner_lr = {n: t for n, t in inner_lr.items() if n in resolve_adapt(model, adapt)}
    weights = None if weight is None or leap != 1 else (weight,)
    loop = _loop(1, inner_lr, per_step, weights, "num_step" if indexed else None, leap=leap, adapt=adapt)
    got = estimators.run("lazy", model, task, loop)
    assert_same_gradient(got, oracle.gradient(model, task, loop))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eta", ["single", "horizon", 0.03])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("indexed", [False, True])
def test_lazy_equals_its_definition_at_several_steps(kind, eta, weighted, indexed):
    steps = 4
    indexed = indexed and kind != "owned"
    kwarg = "num_step" if indexed else None
    model, task = _problem(kind, steps, indexed)
    inner_lr, per_step, keys = rates_for(model, kind, steps)
    weights = (0.1, 0.2, 0.3, 1.0) if weighted else None
    leap = 1.0 if weighted else 0.7
    got = lazymaml.meta_gradient(
        model,
        task,
        steps,
        inner_lr,
        per_step_lr=per_step,
        query_weights=weights,
        jacobian_step=eta,
        leap=leap,
        step_kwarg=kwarg,
    )
    assert_same_gradient(
        got, lazy_definition(model, task, steps, inner_lr, per_step, keys, eta, weights, leap, kwarg)
    )
    if eta == "horizon":
        same = estimators.run(
            "lazy_horizon", model, task, _loop(steps, inner_lr, per_step, weights, kwarg, leap=leap)
        )
        assert_same_gradient(same, got)


def test_lazy_rate_gradient_is_first_order_mamls():
    """With the rates' gradient held to the trajectory's gradients, lazy and first-order MAML give
    the rates the same gradient (they differ in θ only)."""
    model, task = _problem("lslr", 3)
    inner_lr, per_step, keys = rates_for(model, "lslr", 3)
    loop = _loop(3, inner_lr, per_step)
    lazy, first = estimators.run("lazy", model, task, loop), estimators.run("first_order", model, task, loop)
    for key in set(keys.values()):
        torch.testing.assert_close(lazy[key], first[key], rtol=RTOL, atol=ATOL)
    assert any(not torch.allclose(lazy[n], first[n]) for n in ("0.weight", "2.weight"))


# --- the learner ---------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["maml", "first_order", "lazy"])
def test_meta_backward_writes_rate_gradients_and_an_outer_optimizer_trains_them(estimator):
    model, _ = _problem("meta_sgd", 2)
    inner_lr, _, keys = rates_for(model, "lslr", 2)
    tasks = [regression_task(s, shots=5, queries=6) for s in range(3)]
    learner = lazymaml.MetaLearner(model, 2, inner_lr, estimator=estimator, per_step_lr=True, batched=False)
    learner.meta_backward(tasks)
    want = estimators.run(estimator, model, tasks, learner.loop)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=RTOL, atol=ATOL)
    for n, t in inner_lr.items():
        torch.testing.assert_close(t.grad, want[keys[n]], rtol=RTOL, atol=ATOL)
    rates = list(inner_lr.values())
    start = [t.detach().clone() for t in rates]
    outer = torch.optim.SGD([*model.parameters(), *rates], lr=0.05)
    losses = []
    for _ in range(5):
        outer.zero_grad()
        losses.append(learner.meta_backward(tasks).item())
        outer.step()
    assert all(not torch.equal(a, b.detach()) for a, b in zip(start, rates)), "the rates did not change"
    assert losses[-1] < losses[0]


def test_meta_backward_writes_a_model_owned_rate_into_its_parameter():
    model, task = _problem("owned", 2)
    learner = lazymaml.MetaLearner(model, 2, model.rates(), estimator="lazy", batched=False)
    learner.meta_backward([task])
    want = estimators.run("lazy", model, task, learner.loop)
    assert set(want) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=RTOL, atol=ATOL)
    assert all(r.grad.abs().sum() > 0 for r in model.lrs)


def test_meta_backward_adds_to_an_existing_rate_gradient():
    model, task = _problem("scalar", 1)
    rate = torch.tensor(0.1, dtype=F64, requires_grad=True)
    rate.grad = torch.tensor(2.0, dtype=F64)
    lazymaml.MetaLearner(model, 1, rate, estimator="maml", batched=False).meta_backward([task])
    want = estimators.run("maml", model, task, InnerLoop(1, torch.tensor(0.1, dtype=F64, requires_grad=True)))
    torch.testing.assert_close(rate.grad, 2.0 + want["inner_lr"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "settings",
    [
        dict(inner_lr=torch.tensor(0.1, dtype=F64, requires_grad=True)),
        dict(query_weights=(0.5, 1.0)),
        dict(step_kwarg="num_step"),
    ],
    ids=["rates", "query_weights", "step_kwarg"],
)
def test_learner_runs_new_settings_sequentially_and_says_why(settings):
    model = Indexed(2)
    inner_lr = settings.pop("inner_lr", 0.1)
    what = {"query_weights": "query_weights", "step_kwarg": "step_kwarg"}.get(
        next(iter(settings), ""), "learned"
    )
    with pytest.raises(ValueError, match=f"batched=True, but .*{what}.* not batched"):
        lazymaml.MetaLearner(model, 2, inner_lr, batched=True, **settings)
    learner = lazymaml.MetaLearner(model, 2, inner_lr, **settings)
    tasks = [regression_task(s, shots=5, queries=6) for s in range(2)]
    with pytest.warns(lazymaml.SequentialFallback, match=what):
        learner.meta_backward(tasks)
    want = estimators.run("lazy", model, tasks, learner.loop)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=RTOL, atol=ATOL)


def test_learner_refuses_a_rate_that_is_not_a_leaf():
    model, _ = _problem("scalar", 1)
    log_rate = torch.tensor(-2.0, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="'inner_lr' is not a leaf"):
        lazymaml.MetaLearner(model, 1, log_rate.exp(), estimator="maml")


def test_adapt_steps_with_the_learned_rates():
    model, task = _problem("meta_sgd", 2)
    inner_lr, _, _ = rates_for(model, "lslr", 2)
    adapted = lazymaml.MetaLearner(model, 2, inner_lr, per_step_lr=True, batched=False).adapt(task)
    phi = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in range(2):  # plain SGD with the k-th rates, written out
        point = {n: t.requires_grad_() for n, t in phi.items()}
        loss = task.support_loss(lambda x, point=point: functional_call(model, point, (x,)))
        gs = torch.autograd.grad(loss, list(point.values()))
        phi = {n: (t - inner_lr[n][k].detach() * g).detach() for (n, t), g in zip(point.items(), gs)}
    for n, p in adapted.named_parameters():
        torch.testing.assert_close(p, phi[n], rtol=RTOL, atol=ATOL)


# --- contract: refusals and bad input --------------------------------------------------------


@pytest.mark.parametrize(
    "entry", ["truncated", "reptile", "imaml", "maml_hvp", "maml_hvp_sqrt", "truncated_hvp"]
)
@pytest.mark.parametrize("setting", ["inner_lr", "query_weights", "step_kwarg"])
def test_entries_that_do_not_read_the_new_settings_refuse_them_by_name(entry, setting):
    model = Indexed(2)
    task = regression_task(0)
    rate = torch.tensor(0.1, dtype=F64, requires_grad=True)
    kwargs = {"query_weights": dict(query_weights=(0.5, 1.0)), "step_kwarg": dict(step_kwarg="num_step")}
    loop = InnerLoop(2, rate) if setting == "inner_lr" else InnerLoop(2, 0.1, **kwargs[setting])
    before = model_state(with_gradients(model))
    with pytest.raises(
        ValueError, match=f"estimator {entry!r} does not take .*{setting}.*'first_order', 'lazy'"
    ):
        estimators.run(entry, model, task, loop)
    learner_kwargs = {"inner_lr": dict(per_step_lr=False), **kwargs}[setting]
    with pytest.raises(ValueError, match=setting if setting != "inner_lr" else "does not take learned"):
        lazymaml.MetaLearner(
            model, 2, rate if setting == "inner_lr" else 0.1, estimator=entry, **learner_kwargs
        )
    assert_same_state(before, model_state(model))


def test_per_step_lr_is_refused_by_name_by_an_entry_that_does_not_read_it():
    model = mlp([2, 4, 1])
    rates = torch.full((2,), 0.1, dtype=F64, requires_grad=True)
    with pytest.raises(
        ValueError, match=r"per_step_lr= is a setting of estimator .*'lazy'.*, not of 'reptile'"
    ):
        lazymaml.MetaLearner(model, 2, rates, estimator="reptile", per_step_lr=True)


def test_learned_rates_with_adam_are_refused():
    model = mlp([2, 4, 1])
    rate = torch.tensor(0.1, dtype=F64, requires_grad=True)
    for name in ("maml", "lazy", "first_order"):
        with pytest.raises(ValueError, match=r"learned inner rates .* step plain SGD"):
            estimators.run(name, model, regression_task(0), InnerLoop(2, rate, inner_optimizer="adam"))


def _entry_points(model, task):
    def learner(estimator):
        return lambda **kw: lazymaml.MetaLearner(
            model, 2, estimator=estimator, batched=False, **kw
        ).meta_backward([task])

    return {
        "lazymaml.meta_gradient": lambda **kw: lazymaml.meta_gradient(model, task, 2, **kw),
        "estimators.maml": lambda **kw: estimators.maml(model, task, 2, **kw),
        "estimators.first_order": lambda **kw: estimators.first_order(model, task, 2, **kw),
        "as_function(lazy)": lambda **kw: estimators.as_function("lazy")(model, task, 2, **kw),
        "MetaLearner(maml)": learner("maml"),
        "MetaLearner(lazy)": learner("lazy"),
    }


BAD = {
    "a rate of the wrong shape": (
        lambda m: dict(inner_lr={n: torch.full((3,), 0.1, dtype=F64) for n, _ in m.named_parameters()}),
        "has shape \\(3,\\); expected",
    ),
    "a negative rate": (lambda m: dict(inner_lr=torch.tensor(-0.1, dtype=F64)), "negative rate"),
    "query_weights of the wrong length": (
        lambda m: dict(inner_lr=0.1, query_weights=(1.0, 2.0, 3.0)),
        "one weight per inner step \\(steps=2\\), got 3",
    ),
    "query_weights that are not a sequence": (
        lambda m: dict(inner_lr=0.1, query_weights=5),
        "query_weights must be a sequence",
    ),
    "a query weight that is not finite": (
        lambda m: dict(inner_lr=0.1, query_weights=(1.0, float("nan"))),
        "query_weights entry must be a finite real number",
    ),
    "per-step rates with too few steps": (
        lambda m: dict(inner_lr=torch.full((1,), 0.1, dtype=F64), per_step_lr=True),
        "has 1 steps in its leading dimension",
    ),
    "a rate for a parameter not adapted": (
        lambda m: dict(inner_lr={"nope": torch.tensor(0.1, dtype=F64)}),
        "inner_lr has rates for \\['nope'\\]",
    ),
    "a step keyword the model does not take": (
        lambda m: dict(inner_lr=0.1, step_kwarg="num_step"),
        "num_step",
    ),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("entry", list(_entry_points(None, None)))
def test_bad_new_settings_raise_clearly_and_leave_the_model_untouched(entry, bad):
    model = with_gradients(mlp([2, 4, 1]))
    task = regression_task(0)
    settings, message = BAD[bad]
    before = model_state(model)
    with pytest.raises((ValueError, TypeError), match=message):
        _entry_points(model, task)[entry](**settings(model))
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("entry", list(_entry_points(None, None)))
def test_new_settings_leave_the_model_untouched_on_success(entry):
    model = with_gradients(MetaSGD(mlp([2, 4, 1])))
    model.train()
    task = regression_task(0)
    before = model_state(model)
    _entry_points(model, task)[entry](inner_lr=model.rates(), query_weights=(0.5, 1.0))
    after = model_state(model)
    if entry.startswith("MetaLearner"):  # meta_backward adds to .grad: everything else as it was
        before["grads"] = after["grads"]
    assert_same_state(before, after)
