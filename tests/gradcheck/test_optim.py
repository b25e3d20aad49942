"""gradcheck.optim: the pure inner updates against ``torch.optim`` itself (the independent
computation), in float64, over several steps; the specs and their recognition in a factory's
optimizer; the wrapper of any torch.optim optimizer; and the oracle through each optimizer
against finite differences (the student running the real torch.optim class) and a torch.func
port written out from torch.optim's documented update.

Tolerance: the pure updates do the same float64 arithmetic as torch.optim in another order
(rounding ~1e-16 per operation, a few operations per step, 6 steps): rtol 1e-12 leaves four
orders of headroom, while a wrong bias correction or a misplaced ε changes entries by ≥ 1e-6
on these gradients (ε = 1e-8 against √v ~ 1e-3 … 1).
"""

import functools

import pytest
import torch

from gradcheck import compare, finite_differences, oracle, validate
from gradcheck.optim import SGD, Adam, AdamUpdate, AdamW, Sgd, TorchOptimizer, adam_update, safe_sqrt, spec_of
from tests.gradcheck.implementations import functional_maml_momentum_adamw
from tests.helpers import mlp, regression_task

F64 = torch.float64
RTOL, ATOL = 1e-12, 1e-15


def gradients(step, shape=(3, 4)):
    """A gradient sequence with a zero entry (Adam's v = 0 there) and small ones (ε matters)."""
    g = torch.Generator().manual_seed(step)
    grad = torch.randn(shape, generator=g, dtype=F64) * 10.0 ** -(step % 4)
    grad[0, 0] = 0.0
    return {"w": grad, "b": torch.randn(2, generator=g, dtype=F64)}


def run_torch(optimizer_class, steps, **options):
    params = {
        "w": torch.ones(3, 4, dtype=F64, requires_grad=True),
        "b": torch.zeros(2, dtype=F64, requires_grad=True),
    }
    optimizer = optimizer_class(list(params.values()), **options)
    for k in range(steps):
        for n, p in params.items():
            p.grad = gradients(k)[n].clone()
        optimizer.step()
    return {n: p.detach() for n, p in params.items()}


def run_pure(update, steps):
    params = {"w": torch.ones(3, 4, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    state = update.init(params)
    for k in range(steps):
        params, state = update.step(params, gradients(k), state)
    return params


@pytest.mark.parametrize(
    ("update", "optimizer_class", "options"),
    [
        (Sgd(0.1), torch.optim.SGD, dict(lr=0.1)),
        (AdamUpdate(0.05), torch.optim.Adam, dict(lr=0.05)),
        (AdamUpdate(0.05, (0.5, 0.9), 1e-3), torch.optim.Adam, dict(lr=0.05, betas=(0.5, 0.9), eps=1e-3)),
    ],
)
def test_pure_updates_follow_torch_optim(update, optimizer_class, options):
    want = run_torch(optimizer_class, 6, **options)
    got = run_pure(update, 6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=RTOL, atol=ATOL)


def test_spec_of_reads_the_optimizer_group():
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.3, betas=(0.8, 0.95), eps=1e-6)
    assert spec_of(optimizer) == (Adam((0.8, 0.95), 1e-6), 0.3)


def test_only_the_given_names_are_updated():
    params = {"w": torch.ones(2, dtype=F64), "frozen": torch.ones(2, dtype=F64)}
    for update in (Sgd(0.1), AdamUpdate(0.1)):
        out, _ = update.step(params, {"w": torch.ones(2, dtype=F64)}, update.init(params))
        assert out["frozen"] is params["frozen"] and not torch.equal(out["w"], params["w"])


def test_adam_is_differentiable_at_a_zero_second_moment():
    """√v at v = 0 has an infinite derivative; multiplied by ∂v/∂g = 0 it would be nan. The safe
    root's derivative there is 0, and the update's derivative is finite."""
    v = torch.zeros(3, dtype=F64, requires_grad=True)
    (d,) = torch.autograd.grad(safe_sqrt(v).sum(), v)
    assert torch.equal(d, torch.zeros(3, dtype=F64))
    g = torch.tensor([0.0, 1e-3, 1.0], dtype=F64, requires_grad=True)
    p, _, _ = adam_update(
        torch.ones(3, dtype=F64),
        g,
        torch.zeros(3, dtype=F64),
        torch.zeros(3, dtype=F64),
        1,
        0.1,
        (0.9, 0.999),
        1e-8,
    )
    (dp,) = torch.autograd.grad(p.sum(), g)
    assert torch.isfinite(dp).all()


def test_torch_optimizer_steps_copies_never_aliasing_earlier_results():
    update = TorchOptimizer(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    params = {"w": torch.ones(3, 4, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    state = update.init(params)
    returned, copies = [], []
    for k in range(4):
        params, state = update.step(params, gradients(k), state)
        returned.append(params)
        copies.append({n: t.clone() for n, t in params.items()})
    # the optimizer writes its own leaves in place: what it returned earlier must not change
    assert all(torch.equal(r[n], c[n]) for r, c in zip(returned, copies) for n in r)
    want = run_torch(torch.optim.SGD, 4, lr=0.1, momentum=0.9)
    for n in want:
        torch.testing.assert_close(params[n], want[n], rtol=RTOL, atol=ATOL)


# --- the specs: SGD with momentum, dampening, Nesterov and weight decay; Adam with L2; AdamW ---

SPEC_CASES = [
    (SGD(momentum=0.9), dict(momentum=0.9)),
    (SGD(momentum=0.9, dampening=0.3), dict(momentum=0.9, dampening=0.3)),
    (SGD(momentum=0.8, nesterov=True), dict(momentum=0.8, nesterov=True)),
    (SGD(weight_decay=0.05), dict(weight_decay=0.05)),
    (
        SGD(momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    ),
    (Adam(weight_decay=0.1), dict(weight_decay=0.1)),
    (Adam((0.5, 0.9), 1e-3, 0.05), dict(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.05)),
    (AdamW(), {}),
    (AdamW((0.8, 0.95), 1e-6, 0.2), dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2)),
]


@pytest.mark.parametrize(("spec", "options"), SPEC_CASES, ids=repr)
def test_each_spec_s_pure_update_follows_torch_optim(spec, options):
    """Six steps of the pure update against the real torch.optim class (rtol 1e-12, float64)."""
    lr = 0.05
    want = run_torch(spec.torch_class, 6, lr=lr, **options)
    got = run_pure(spec.update(lr), 6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=RTOL, atol=ATOL)
    assert spec.options() == {**spec.options(), **options}  # the spec hands torch these options


SGD_CASES = [(SGD(), {}), *[(spec, options) for spec, options in SPEC_CASES if isinstance(spec, SGD)]]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("spec", "options"), SGD_CASES, ids=repr)
def test_the_sgd_rule_is_torch_optim_sgd_to_the_bit(spec, options, foreach, dtype):
    """Written as torch's step is (each scaled sum one ``add`` with ``alpha``), the pure SGD
    update equals torch.optim.SGD exactly on CPU — single-tensor and foreach alike — in float32
    and float64, over six steps, with every option."""
    params = {"w": torch.ones(3, 4, dtype=dtype, requires_grad=True), "b": torch.zeros(2, dtype=dtype)}
    params["b"].requires_grad_(True)
    optimizer = torch.optim.SGD(list(params.values()), lr=0.05, foreach=foreach, **options)
    pure = {n: p.detach().clone() for n, p in params.items()}
    update = spec.update(0.05)
    state = update.init(pure)
    for k in range(6):
        grads = {n: g.to(dtype) for n, g in gradients(k).items()}
        for n, p in params.items():
            p.grad = grads[n].clone()
        optimizer.step()
        pure, state = update.step(pure, grads, state)
    assert all(torch.equal(pure[n], params[n].detach()) for n in params)


@pytest.mark.parametrize(("spec", "options"), SPEC_CASES, ids=repr)
def test_spec_of_recognises_what_a_factory_builds(spec, options):
    optimizer = spec.torch_class([torch.zeros(1, requires_grad=True)], lr=0.2, **options)
    assert spec_of(optimizer) == (spec, 0.2)


def test_adam_with_decoupled_weight_decay_is_adamw():
    optimizer = torch.optim.Adam(
        [torch.zeros(1, requires_grad=True)], lr=0.1, weight_decay=0.1, decoupled_weight_decay=True
    )
    assert spec_of(optimizer) == (AdamW(weight_decay=0.1), 0.1)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "maximize=True is not differentiated"),
        (lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True), "amsgrad=True is not differentiated"),
        (lambda p: torch.optim.RMSprop(p, lr=0.1), "torch.optim.rmsprop.RMSprop is not one of"),
        (
            lambda p: torch.optim.SGD([{"params": p[:1]}, {"params": p[1:], "lr": 0.2}], lr=0.1),
            "SGD with 2 parameter groups",
        ),
    ],
)
def test_spec_of_refuses_by_name_what_no_update_follows(build, message):
    with pytest.raises(ValueError, match=message):
        spec_of(build([torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]))


def test_foreach_and_fused_do_not_matter():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.5, foreach=True)
    assert spec_of(optimizer) == (SGD(momentum=0.5), 0.1)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: SGD(nesterov=True), ValueError, "nesterov needs momentum > 0 and dampening 0"),
        (lambda: SGD(momentum=0.9, dampening=0.1, nesterov=True), ValueError, "dampening 0"),
        (lambda: SGD(momentum=-0.1), ValueError, "momentum must be >= 0"),
        (lambda: SGD(nesterov=1), TypeError, "nesterov must be True or False"),
        (lambda: Adam(betas=(0.9, 1.0)), ValueError, r"β₂ must be in \[0, 1\)"),
        (lambda: Adam(betas=0.9), TypeError, "betas must be a pair"),
        (lambda: AdamW(eps=float("nan")), TypeError, "eps must be a finite real"),
        (lambda: AdamW(weight_decay=True), TypeError, "weight_decay must be a finite real"),
    ],
)
def test_specs_refuse_bad_options(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_specs_are_hashable_and_normalised():
    assert hash(SGD(momentum=0.9)) == hash(SGD(momentum=0.9, dampening=0))
    assert Adam(betas=[0.9, 0.999]) == Adam() and type(Adam().betas) is tuple
    assert AdamW() != Adam(weight_decay=0.01)  # decoupled is not coupled


# --- the oracle through each optimizer, against finite differences and a torch.func port ---

ORACLE_SPECS = [
    SGD(momentum=0.9),
    SGD(momentum=0.9, dampening=0.3, weight_decay=0.05),
    SGD(momentum=0.8, nesterov=True, weight_decay=1e-2),
    Adam(weight_decay=0.1),
    AdamW(weight_decay=0.2),
]


@pytest.mark.parametrize("spec", ORACLE_SPECS, ids=repr)
def test_the_oracle_through_each_optimizer_agrees_with_finite_differences(spec):
    """Directional central differences of F, the student running the real torch.optim class
    (``finite_differences.check``, its own error bound per direction)."""
    model, task = mlp([2, 5, 1], "tanh"), regression_task(1)
    g = oracle.meta_gradient(model, task, 4, 0.05, inner_optimizer=spec)
    report = finite_differences.check(g, model, task, 4, 0.05, inner_optimizer=spec)
    assert report.ok(), str(report)
    default = oracle.meta_gradient(model, task, 4, 0.05, inner_optimizer=type(spec)())
    assert not compare(g, default).ok()  # the options change the meta-gradient (never dropped)


@pytest.mark.parametrize(
    "spec", [SGD(momentum=0.9, nesterov=True, weight_decay=0.05), AdamW(weight_decay=0.2)], ids=repr
)
def test_momentum_and_adamw_agree_with_coordinatewise_differences_to_1e_8(spec):
    """Every coordinate of a 13-parameter MLP: central differences at h = 1e-6 have truncation
    error ~h²·F‴ ≈ 1e-12 and rounding ~ε·F/h ≈ 1e-10, so 1e-8 relative holds with headroom while
    a dropped option (momentum, decay) moves the gradient by far more (asserted above)."""
    model, task = mlp([2, 3, 1], "tanh"), regression_task(2)
    g = oracle.meta_gradient(model, task, 3, 0.1, inner_optimizer=spec)
    numerical = finite_differences.meta_gradient(model, task, 3, 0.1, inner_optimizer=spec)
    report = compare(g, numerical)
    assert report.overall.rel_error <= 1e-8, report.table()


@pytest.mark.parametrize("spec", ORACLE_SPECS[:1] + ORACLE_SPECS[-1:], ids=repr)
def test_a_factory_of_the_torch_optim_class_is_the_spec(spec):
    model, task = mlp([2, 5, 1], "tanh"), regression_task(1)
    factory = lambda p: spec.torch_class(p, lr=0.05, **spec.options())  # noqa: E731
    compare(
        oracle.meta_gradient(model, task, 3, 0.05, inner_optimizer=factory),
        oracle.meta_gradient(model, task, 3, 0.05, inner_optimizer=spec),
    ).assert_close(0, 0)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda p: torch.optim.Adam(p, lr=0.05, amsgrad=True), "amsgrad=True is not differentiated"),
        (lambda p: torch.optim.SGD(p, lr=0.05, maximize=True), "maximize=True is not differentiated"),
        (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), "its SGD's lr 0.01 is not inner_lr 0.05"),
        (lambda p: torch.optim.RMSprop(p, lr=0.05), "RMSprop is not one of torch.optim.SGD, Adam, AdamW"),
    ],
)
def test_the_oracle_refuses_by_name_what_it_cannot_differentiate(factory, message):
    model, task = mlp([2, 5, 1], "tanh"), regression_task(1)
    with pytest.raises(ValueError, match=f"the oracle differentiates exactly through .*{message}"):
        oracle.meta_gradient(model, task, 3, 0.05, inner_optimizer=factory)


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        (SGD(momentum=0.9, weight_decay=0.05), dict(optimizer="momentum", weight_decay=0.05)),
        (SGD(momentum=0.9, nesterov=True), dict(optimizer="momentum", nesterov=True)),
        (AdamW(weight_decay=0.2), dict(optimizer="adamw", weight_decay=0.2)),
    ],
    ids=repr,
)
def test_validate_passes_a_torch_func_port_with_that_optimizer(spec, options):
    model, tasks = mlp([2, 6, 1], "tanh"), [regression_task(seed) for seed in range(3)]
    candidate = functools.partial(functional_maml_momentum_adamw, **options)
    result = validate(candidate, model, tasks, 4, 0.05, inner_optimizer=spec)
    assert result.ok(), str(result)
    assert result.overall.overall.rel_error < 1e-13
    wrong = functools.partial(functional_maml_momentum_adamw, **{**options, "weight_decay": 0.0})
    if options.get("weight_decay"):
        assert not validate(wrong, model, tasks, 4, 0.05, inner_optimizer=spec, diagnosis=False).gradient_ok()
