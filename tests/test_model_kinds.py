"""The contract table: model kind × entry point, each cell exact or a clear refusal.

Entry points: the oracle (``oracle.meta_gradient``), ``validate`` with a correct hand-written
candidate (a ``torch.func.functional_call`` unroll written here, sharing nothing with the
oracle), ``finite_differences.check``, and lazymaml's exact-MAML estimator, lazy gradient (at
K = 1) and ``MetaLearner`` sequential and batched (the last section). Every cell leaves the
model exactly as it was (``model_state``/``assert_same_state``) and the caller's generator state untouched.

* **exact** kinds: the oracle agrees with coordinate-wise finite differences at
  ``tolerances.COORDINATEWISE`` (the independent witness, derived in docs/verification.md),
  ``validate`` passes the hand-written candidate with its reference self-check agreeing, and the
  directional check passes the oracle's gradient.
* **torch defect** kinds (``torch._weight_norm``'s second derivative on torch 2.13 CPU): the
  reference self-check disagrees, and ``validate`` says "cannot verify" — never PASS, never FAIL.
* **convention** kinds (``Embedding(padding_idx=…)``): the autograd answer is a convention; the
  reports name it.
* **refused** kinds: an exception naming the cause and what to pass instead, on every entry point.

Tiny float64 models (at most a few dozen parameters), K = 2: the file runs in seconds.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize
import torch.nn.utils.prune
from torch import nn
from torch.func import functional_call

import lazymaml
from gradcheck import Task, finite_differences, oracle, validate
from gradcheck.models import common_random_numbers
from gradcheck.parameters import resolve_adapt
from gradcheck.tolerances import COORDINATEWISE
from lazymaml import estimators
from tests.helpers import assert_same_state, model_state

F64 = torch.float64
K, LR = 2, 0.3


def _task(inputs=3, outputs=2, seed=1, integer=False):
    g = torch.Generator().manual_seed(seed)

    def batch(n):
        x = (
            torch.randint(0, 5, (n, 2), generator=g)
            if integer
            else torch.randn(n, inputs, generator=g, dtype=F64)
        )
        return x, torch.randn(n, outputs, generator=g, dtype=F64)

    return Task(batch(5), batch(6), F.mse_loss)


def _mlp(seed=0, *extra):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), *extra, nn.Linear(4, 2)).to(F64)


class Count(nn.Module):
    """A buffer reassigned in forward (not in place): carried like an in-place update."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2).to(F64)
        self.register_buffer("count", torch.zeros((), dtype=F64))

    def forward(self, x):
        self.count = self.count + 1
        return self.linear(x) * self.count.sqrt()


class Outputs(nn.Module):
    """Dict, tuple and namedtuple outputs; the loss reads one entry."""

    Pair = collections.namedtuple("Pair", "main aux")

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.linear = nn.Linear(3, 2).to(F64)

    def forward(self, x):
        y = torch.tanh(self.linear(x))
        return {"dict": {"main": y, "aux": x}, "tuple": (y, x), "namedtuple": self.Pair(y, x)}[self.kind]


def _main(out, y):
    main = out["main"] if isinstance(out, dict) else out[0]
    return F.mse_loss(main, y)


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = (
            nn.LSTM(3, 3, proj_size=2, batch_first=True) if cell == "lstm" else nn.GRU(3, 2, batch_first=True)
        )
        self.rnn.to(F64)

    def forward(self, x):
        out, _ = self.rnn(x.view(x.shape[0], 1, 3))
        return out[:, -1]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 2).to(F64)
        self.mid = nn.Linear(2, 2).to(F64)
        self.out = nn.Linear(2, 5).to(F64)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.mid(self.emb(idx).mean(1))))[:, :2]


class Buffers(nn.Module):
    """An integer-only buffer and a non-persistent float buffer read by forward."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2).to(F64)
        self.register_buffer("steps", torch.tensor(3))
        self.register_buffer("scale", torch.tensor(1.5, dtype=F64), persistent=False)

    def forward(self, x):
        return self.linear(x) * self.scale + self.steps


def _twice():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(3, 2)).to(F64)


def _frozen():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    return model


def _hooked():
    model = _mlp()
    model[2].register_forward_hook(lambda module, inputs, output: 2 * output)
    model[0].register_forward_pre_hook(lambda module, inputs: (1.5 * inputs[0],))
    return model


def _pruned():
    model = _mlp()
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.4)
    return model


def _spectral_eval():
    model = _mlp()
    torch.nn.utils.spectral_norm(model[2])
    model(torch.randn(2, 3, dtype=F64))  # one power iteration, then frozen u, v
    return model.eval()


class _Symmetric(nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).T


def _parametrized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).to(F64)
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", _Symmetric())
    return model


def _spectral_parametrization_eval():
    model = _mlp()
    torch.nn.utils.parametrizations.spectral_norm(model[2])
    model(torch.randn(2, 3, dtype=F64))
    return model.eval()


def _observing_backward_hook():
    model = _mlp()
    model[2].register_full_backward_hook(lambda module, grad_input, grad_output: None)
    return model


def _legacy_weight_norm():
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(model[0])
    return model


def _parametrized_weight_norm():
    model = _mlp()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    return model


def _norms(kind):
    torch.manual_seed(0)
    norm = {
        "layernorm": nn.LayerNorm(8),
        "groupnorm": nn.GroupNorm(2, 4),
        "instancenorm": nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
        "batchnorm-eval": nn.BatchNorm1d(4),
        "batchnorm-cumulative": nn.BatchNorm1d(4, momentum=None, track_running_stats=True),
    }[kind]
    model = nn.Sequential(
        nn.Linear(3, 8), nn.Unflatten(1, (4, 2)), norm, nn.Flatten(), nn.Tanh(), nn.Linear(8, 2)
    )
    model = model.to(F64)
    if kind == "batchnorm-eval":
        with torch.no_grad():
            norm.running_mean.uniform_(-0.3, 0.3)
            norm.running_var.uniform_(0.5, 2.0)
        model.eval()
    if kind == "layernorm":
        model[1], model[3] = nn.Identity(), nn.Identity()
    return model


def _dropout():
    return _mlp(0, nn.Dropout(0.3))


EXACT = {
    "mlp": (_mlp, _task),
    "forward and pre-forward hooks": (_hooked, _task),
    "prune": (_pruned, _task),
    "spectral_norm (hook, eval)": (_spectral_eval, _task),
    "parametrize (custom)": (_parametrized, _task),
    "parametrizations.spectral_norm (eval)": (_spectral_parametrization_eval, _task),
    "backward hook (observing)": (_observing_backward_hook, _task),
    "dropout (train)": (_dropout, _task),
    "reassigned buffer": (Count, _task),
    "lstm proj_size": (lambda: Recurrent("lstm"), _task),
    "gru": (lambda: Recurrent("gru"), _task),
    "tied weights": (Tied, lambda: _task(integer=True)),
    "dict output": (lambda: Outputs("dict"), lambda: Task(_task().support, _task().query, _main)),
    "tuple output": (lambda: Outputs("tuple"), lambda: Task(_task().support, _task().query, _main)),
    "namedtuple output": (lambda: Outputs("namedtuple"), lambda: Task(_task().support, _task().query, _main)),
    "frozen parameter": (_frozen, _task),
    "integer and non-persistent buffers": (Buffers, _task),
    "submodule registered twice": (_twice, _task),
    **{
        kind: (lambda kind=kind: _norms(kind), _task)
        for kind in ("layernorm", "groupnorm", "instancenorm", "batchnorm-eval", "batchnorm-cumulative")
    },
}
DEFECT = {
    "weight_norm (hook, legacy)": _legacy_weight_norm,
    "parametrizations.weight_norm": _parametrized_weight_norm,
}


def candidate(model, task, steps, inner_lr):
    """Correct K-step MAML, written from the definition over functional_call (parameters only:
    buffers are the module's own, so they carry across the forwards as the oracle's do)."""
    theta = {n: p for n, p in model.named_parameters() if p.requires_grad}
    phi = dict(theta)

    def f(*x):
        return functional_call(model, phi, x)

    for _ in range(steps):
        grads = torch.autograd.grad(
            task.support_loss(f), list(phi.values()), create_graph=True, allow_unused=True
        )
        phi = {n: t if g is None else t - inner_lr * g for (n, t), g in zip(phi.items(), grads)}
    query = task.query_loss(f)
    return dict(zip(theta, torch.autograd.grad(query, list(theta.values()), allow_unused=True)))


def _unchanged(model, run):
    before, rng = model_state(model), torch.get_rng_state()
    out = run()
    assert_same_state(before, model_state(model))
    assert torch.equal(rng, torch.get_rng_state()), "the caller's generator state changed"
    return out


@pytest.mark.parametrize("kind", list(EXACT))
def test_exact_kinds(kind):
    build, make_task = EXACT[kind]
    model, task = build(), make_task()
    g = _unchanged(model, lambda: oracle.meta_gradient(model, task, K, LR))
    numerical = _unchanged(model, lambda: finite_differences.meta_gradient(model, task, K, LR))
    for name in g:
        rtol, atol = COORDINATEWISE
        torch.testing.assert_close(g[name], numerical[name], rtol=rtol, atol=atol, msg=f"{kind}: {name}")
    result = _unchanged(model, lambda: validate(candidate, model, task, K, LR))
    assert result.gradient_ok(), result.summary()
    assert result.reference_check is not None and result.reference_check.ok(), result.summary()
    report = _unchanged(model, lambda: finite_differences.check(g, model, task, K, LR, directions=3))
    assert report.ok(), str(report)


@pytest.mark.parametrize("kind", list(DEFECT))
def test_torch_weight_norm_defect_cannot_be_verified(kind):
    model, task = DEFECT[kind](), _task()
    result = _unchanged(model, lambda: validate(candidate, model, task, K, LR))
    assert result.reference_disagrees, result.summary()
    assert not result.gradient_ok() and not result.ok()
    assert result.headline().startswith(
        "cannot verify on this model: the oracle disagrees with finite differences"
    )
    assert "PASS" not in result.summary() and "DISAGREES" in result.summary()
    with pytest.raises(AssertionError, match="cannot verify"):
        result.assert_close()
    assert result.diagnosis is None


def test_torch_weight_norm_double_backward_is_wrong_on_this_torch():
    """Pinned: torch 2.13 CPU's second derivative of torch._weight_norm fails gradgradcheck while
    its first passes. When a torch upgrade fixes it, this test fails: then the weight-norm kinds
    above become exact and move to EXACT."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    norm = (torch.rand(4, 1, generator=g, dtype=F64) + 0.5).requires_grad_()
    fn = lambda v, n: torch._weight_norm(v, n, 0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v, norm))
    assert not torch.autograd.gradgradcheck(fn, (v, norm), raise_exception=False)


def test_validate_without_reference_check_says_so():
    model, task = _legacy_weight_norm(), _task()
    result = validate(candidate, model, task, K, LR, check_reference=False)
    assert result.reference_check is None and "check_reference=False" in result.reference_note


def test_padding_idx_convention_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 2, padding_idx=0), nn.Flatten(), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    task = _task(integer=True)
    result = _unchanged(model, lambda: validate(candidate, model, task, K, LR))
    assert "padding_idx=0" in result.summary()
    g = oracle.meta_gradient(model, task, K, LR)
    report = finite_differences.check(g, model, task, K, LR)
    assert "padding_idx=0" in str(report)


CONVENTIONS = {
    "Embedding(padding_idx)": (
        lambda: nn.Sequential(nn.Embedding(5, 2, padding_idx=0), nn.Flatten(), nn.Tanh(), nn.Linear(4, 2)),
        "padding_idx=0",
    ),
    "Embedding(max_norm)": (
        lambda: nn.Sequential(nn.Embedding(5, 2, max_norm=0.5), nn.Flatten(), nn.Tanh(), nn.Linear(4, 2)),
        "max_norm=0.5",
    ),
    "spectral_norm (train)": (lambda: _spectral_train(), "spectral_norm in train mode"),
    "backward hook changing gradients": (lambda: _hooked_backward(), "a backward hook"),
    "tensor hook on a parameter": (lambda: _hooked_parameter(), "2.weight: a tensor hook"),
}


def _spectral_train():
    model = _mlp()
    torch.nn.utils.spectral_norm(model[2])
    return model


def _hooked_backward():
    model = _mlp()
    model[2].register_full_backward_hook(
        lambda module, grad_input, grad_output: tuple(2 * g for g in grad_input)
    )
    return model


def _hooked_parameter():
    model = _mlp()
    model[2].weight.register_hook(lambda g: 3 * g)  # gradient scaling, as a user's clipping hook
    return model


def test_a_tensor_hook_on_a_parameter_is_named_with_learned_rates_too():
    # the rates' path unrolls over functional_call from θ itself: the hook also fires in step 0
    torch.manual_seed(0)
    model, task = _hooked_parameter().to(F64), _task()
    alpha = torch.tensor(LR, dtype=F64, requires_grad=True)
    result = _unchanged(model, lambda: validate(candidate, model, task, K, alpha))
    assert "2.weight: a tensor hook" in result.summary()
    assert result.headline().startswith("cannot verify")


def test_a_tensor_hook_on_a_learned_rate_is_named():
    torch.manual_seed(0)
    model, task = _mlp().to(F64), _task()
    alpha = torch.tensor(LR, dtype=F64, requires_grad=True)
    alpha.register_hook(lambda g: 3 * g)
    result = _unchanged(model, lambda: validate(candidate, model, task, K, alpha))
    assert "learned rates ['inner_lr'] have a tensor hook" in result.summary()
    assert result.headline().startswith("cannot verify")


@pytest.mark.parametrize("kind", list(CONVENTIONS))
def test_conventions_are_named_where_finite_differences_disagree(kind):
    build, named = CONVENTIONS[kind]
    torch.manual_seed(0)
    model = build().to(F64)
    task = _task(integer=kind.startswith("Embedding"))
    result = _unchanged(model, lambda: validate(candidate, model, task, K, LR))
    assert named in result.summary()
    assert "PASS" not in result.headline()


def test_dropout_draws_are_common_and_the_global_state_is_kept():
    model, task = _dropout(), _task()
    torch.manual_seed(123)
    first = oracle.meta_gradient(model, task, K, LR)
    assert torch.initial_seed() == 123
    second = oracle.meta_gradient(model, task, K, LR)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert "Dropout" in validate(candidate, model, task, K, LR).summary()


def test_tied_head_is_resolved_by_module():
    model, task = Tied(), _task(integer=True)
    assert resolve_adapt(model, "head") == ("emb.weight", "out.bias")
    assert resolve_adapt(model, "body") == ("mid.weight", "mid.bias")
    g = oracle.meta_gradient(model, task, K, LR, adapt="head")
    numerical = finite_differences.meta_gradient(model, task, K, LR, adapt="head")
    rtol, atol = COORDINATEWISE
    for name in g:
        torch.testing.assert_close(g[name], numerical[name], rtol=rtol, atol=atol, msg=name)


def _refusals():
    torch.manual_seed(0)
    model = _mlp()
    yield "compiled", torch.compile(model), _task(), "_orig_mod"
    yield "DataParallel", nn.DataParallel(model), _task(), "model.module"
    yield "float32 model, float64 data", _mlp().float(), _task(), "torch.float32.*torch.float64"
    yield "float64 model, float32 data", model, _task().to(torch.float32), "torch.float64.*torch.float32"


REFUSALS = {name: (m, t, match) for name, m, t, match in _refusals()}
ENTRY_POINTS = {
    "oracle": lambda m, t: oracle.meta_gradient(m, t, K, LR),
    "validate": lambda m, t: validate(candidate, m, t, K, LR),
    "finite_differences.check": lambda m, t: finite_differences.check(
        {n: torch.zeros_like(p) for n, p in m.named_parameters()}, m, t, K, LR
    ),
    "finite_differences.meta_gradient": lambda m, t: finite_differences.meta_gradient(m, t, K, LR),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("kind", list(REFUSALS))
def test_refused_kinds_name_the_cause(kind, entry):
    model, task, match = REFUSALS[kind]
    before = model_state(model)
    with pytest.raises(TypeError, match=match):
        ENTRY_POINTS[entry](model, task)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_inference_mode_is_refused(entry):
    model, task = _mlp(), _task()
    with (
        torch.inference_mode(),
        pytest.raises(RuntimeError, match="inference mode forbids the meta-gradient"),
    ):
        ENTRY_POINTS[entry](model, task)


@pytest.mark.parametrize("entry", ["oracle", "validate"])
def test_no_grad_is_fine(entry):
    model, task = _mlp(), _task()
    with torch.no_grad():
        ENTRY_POINTS[entry](model, task)


class Midway(nn.Module):
    """Raises on its third forward, after writing a buffer in place."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2).to(F64)
        self.register_buffer("calls", torch.zeros((), dtype=F64))

    def forward(self, x):
        self.calls += 1
        self.linear.weight.data.add_(1.0)
        if self.calls >= 3:
            raise RuntimeError("midway")
        return self.linear(x)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_error_midway_leaves_the_model_restored(entry):
    model, task = Midway(), _task()
    before = model_state(model)
    with pytest.raises(RuntimeError, match="midway"):
        ENTRY_POINTS[entry](model, task)
    assert_same_state(before, model_state(model))


def test_hooked_model_with_buffers_starts_every_task_from_the_model():
    """The functional unroll (hooked models) writes the model's own buffers: each task starts from
    the model's values, as finite differences (fresh copies per task) and the higher unroll do."""
    model, tasks = Count(), [_task(seed=1), _task(seed=2)]
    model.linear.register_forward_hook(lambda module, inputs, output: output + 0.5)
    g = _unchanged(model, lambda: oracle.meta_gradient(model, tasks, K, LR))
    numerical = finite_differences.meta_gradient(model, tasks, K, LR)
    rtol, atol = COORDINATEWISE
    for name in g:
        torch.testing.assert_close(g[name], numerical[name], rtol=rtol, atol=atol, msg=name)


# --- the lazymaml columns: the project's own estimators and learner on every exact kind ---------
#
# Each against the oracle of the same cell (itself held to finite differences above): the
# registry's exact-MAML unroll and MetaLearner(estimator="maml") at K = 2, and the lazy gradient at
# K = 1, where it *is* exact MAML. Under Dropout every path draws its masks from the common seed
# (gradcheck.models.common_random_numbers) in the oracle's order — support forward at each step,
# then the query — except the lazy gradient, whose Hessian-vector product runs one more support
# forward at θ and so draws a mask exact MAML never sees: no identity holds there, and that cell
# is left out. The batched learner is exact or refuses (batched=True) naming why.
LAZYMAML_RTOL = 1e-10  # two float64 computations of one quantity (measured ≤ 1e-15 on these)


def _seeded(model, fn, task, steps):
    with common_random_numbers(model):
        return fn(model, task, steps, LR)


def _learned(model, task, batched):
    learner = lazymaml.MetaLearner(model, K, LR, estimator="maml", batched=batched)
    with common_random_numbers(model):
        learner.meta_backward([task, task] if batched else [task])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _close(got, want, kind):
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=LAZYMAML_RTOL, atol=1e-13, msg=f"{kind}: {name}"
        )


@pytest.mark.filterwarnings("ignore::lazymaml.SequentialFallback")
@pytest.mark.parametrize("kind", list(EXACT))
def test_lazymaml_columns_of_the_exact_kinds(kind):
    build, make_task = EXACT[kind]
    model, task = build(), make_task()
    exact = oracle.meta_gradient(model, task, K, LR)
    unrolled = _unchanged(model, lambda: _seeded(model, estimators.as_function("maml"), task, K))
    _close(unrolled, exact, kind)
    if kind != "dropout (train)":
        lazy = _unchanged(model, lambda: lazymaml.meta_gradient(model, task, 1, LR))
        _close(lazy, oracle.meta_gradient(model, task, 1, LR), kind)
    _close(_learned(model, task, batched=False), exact, kind)
    before = model_state(model)
    try:
        batched = _learned(model, task, batched=True)
    except ValueError as refusal:
        assert str(refusal).startswith("batched=True, but "), str(refusal)
        # known from the model before anything runs, not a failure inside vmap
        assert "the batched computation raised" not in str(refusal), str(refusal)
    else:
        _close(batched, exact, kind)
    assert_same_state(before, model_state(model))
