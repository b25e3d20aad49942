"""Ports of meta-learners with learned inner rates — Meta-SGD in learn2learn's layout, MAML++
(LSLR, the multi-step loss, per-step BatchNorm, ``num_step``), a learned scalar α — and of inner
optimizers with state (SGD with momentum and weight decay, AdamW), written as users write them
(tests/gradcheck/implementations.py).

For each port: the oracle agrees with coordinate-wise finite differences on the weights *and* on
the rates (an independent computation: the student stepping with the rates, differenced); the
port returns the oracle's meta-gradient, rate gradients included, so ``validate`` passes it; and
each classic mistake — the rates detached, first-order by mistake (no ``create_graph``), MAML++'s
per-step rates shared across steps, only the last step's query loss — fails with its label.

**Tolerance of the finite-difference check.** Central differences at h = 1e-6 in float64 have
truncation error h²|F‴|/6 ≈ 1e-13 and rounding error about σ/h per coordinate, where σ, the
rounding of one evaluation of F, is 0.02–9 ε|F| (measured, docs/verification.md): 2e-12 to
2e-9 |F| per coordinate. Over n ≤ 250 coordinates of O(1) objectives with ‖g‖ = O(0.1–1), the
norm-wise relative error is at most √n · 2e-9 |F| / ‖g‖ ≈ 3e-8 in the worst case and ~1e-9
typically; measured 1.3e-10 to 4e-10 on these problems. A wrong meta-gradient the tests keep is
off by 1e-3 or more. So each block (all weights, all rates, everything) is held to 1e-8 relative,
and each row to :data:`gradcheck.tolerances.COORDINATEWISE` (a row's own norm can be small: the
bias rates of MAML++'s head, whose gradient is 3e-2, differ by 3e-8 relative).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from gradcheck import compare, finite_differences, oracle, validate
from gradcheck.optim import SGD, AdamW
from gradcheck.tolerances import COORDINATEWISE
from tests.gradcheck import implementations as ports
from tests.helpers import assert_same_state, image_task, mlp, model_state, regression_task

FD_RTOL = 1e-8  # derived in the module docstring
PORT_RTOL = 1e-12  # two float64 implementations of one meta-gradient (gradcheck.tolerances)


@dataclass
class Port:
    """One port on its problem: the model, tasks, K, ``inner_lr`` as the user gives it, the other
    settings (the keywords of the oracle, finite differences and validate), the correct
    candidate, the broken ones by the label the diagnosis must give, and the meta-gradient keys
    of the learned rates."""

    model: torch.nn.Module
    tasks: list
    steps: int
    inner_lr: Any
    settings: dict[str, Any]
    correct: Callable[..., Any]
    broken: dict[str, Callable[..., Any]]
    rates: tuple[str, ...] = field(default=())


def meta_sgd() -> Port:
    """Meta-SGD: per-entry rates, parameters of the wrapper (``lrs.i``), spread so they differ."""
    model = ports.MetaSGD(mlp([2, 5, 1]), 0.1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lr in model.lrs:
            lr.mul_(1 + 0.5 * torch.rand(lr.shape, generator=g, dtype=lr.dtype))
    return Port(
        model,
        [regression_task(seed) for seed in range(2)],
        3,
        model.inner_lr(),
        {},
        ports.meta_sgd_maml,
        {
            "rates_detached": functools.partial(ports.meta_sgd_maml, detach_rates=True),
            "first_order": functools.partial(ports.meta_sgd_maml, create_graph=False),
        },
        tuple(f"lrs.{i}" for i in range(4)),
    )


def learned_alpha() -> Port:
    """One learned scalar α for every entry, not a parameter of the model (key ``inner_lr``)."""
    alpha = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    return Port(
        mlp([2, 5, 1]),
        [regression_task(seed) for seed in range(2)],
        3,
        alpha,
        {},
        ports.learned_alpha_maml,
        {
            "rates_detached": functools.partial(ports.learned_alpha_maml, detach_rates=True),
            "first_order": functools.partial(ports.learned_alpha_maml, create_graph=False),
        },
        ("inner_lr",),
    )


def maml_plus_plus(spread: float = 0.03) -> Port:
    """MAML++ at K = 3: LSLR (K + 1 rates per adapted tensor, spread so the steps differ), the
    multi-step loss at epoch 3 of 10, per-step BatchNorm, the step index as ``num_step``."""
    steps = 3
    model = ports.MAMLPlusPlusNet(steps)
    weights = ports.multi_step_weights(steps, epoch=3, anneal_epochs=10)
    port = functools.partial(ports.maml_plus_plus, query_weights=weights)
    return Port(
        model,
        [image_task(seed) for seed in range(2)],
        steps,
        ports.lslr_rates(model, steps, 0.1, spread=spread),
        dict(
            adapt=list(ports.MAMLPP_ADAPTED),
            per_step_lr=True,
            query_weights=weights,
            step_kwarg="num_step",
        ),
        port,
        {
            "rates_detached": functools.partial(port, detach_rates=True),
            "first_order": functools.partial(port, create_graph=False),
            "per_step_rates_shared": functools.partial(port, shared_steps=True),
            "last_step_only": ports.maml_plus_plus,  # query_weights left out: L_Q(φ_K) alone
        },
        tuple(f"inner_lr.{n}" for n in ports.MAMLPP_ADAPTED),
    )


def stateful(spec, **options) -> Callable[[], Port]:
    """An inner optimizer with state (gradcheck.optim spec), its torch.func port."""

    def build() -> Port:
        port = functools.partial(ports.functional_maml_momentum_adamw, **options)
        return Port(
            mlp([2, 6, 1]),
            [regression_task(seed) for seed in range(3)],
            4,
            0.05,
            {"inner_optimizer": spec},
            port,
            {"first_order": functools.partial(port, create_graph=False)},
        )

    return build


PORTS: dict[str, Callable[[], Port]] = {
    "meta_sgd": meta_sgd,
    "learned_alpha": learned_alpha,
    "maml_plus_plus": maml_plus_plus,
    "momentum_weight_decay": stateful(SGD(momentum=0.9, weight_decay=0.05), weight_decay=0.05),
    "adamw": stateful(AdamW(weight_decay=0.2), optimizer="adamw", weight_decay=0.2),
}
BROKEN = [(name, label) for name, build in PORTS.items() for label in build().broken]


def _relative(candidate: dict, reference: dict, keys) -> float:
    keys = list(keys)
    difference = torch.cat([(candidate[k] - reference[k]).flatten() for k in keys]).norm()
    return (difference / torch.cat([reference[k].flatten() for k in keys]).norm()).item()


@pytest.mark.parametrize("name", list(PORTS))
def test_the_oracle_agrees_with_coordinatewise_finite_differences_on_weights_and_rates(name):
    port = PORTS[name]()
    before = model_state(port.model)
    exact = oracle.meta_gradient(port.model, port.tasks, port.steps, port.inner_lr, **port.settings)
    numerical = finite_differences.meta_gradient(
        port.model, port.tasks, port.steps, port.inner_lr, **port.settings
    )
    assert_same_state(before, model_state(port.model))
    weights = [n for n, p in port.model.named_parameters() if n not in port.rates]
    assert list(exact) == list(numerical) == weights + [k for k in port.rates if k not in weights]
    assert _relative(exact, numerical, exact) <= FD_RTOL
    assert _relative(exact, numerical, weights) <= FD_RTOL
    report = compare(exact, numerical)
    assert report.ok(*COORDINATEWISE), report.table(*COORDINATEWISE)
    if port.rates:  # the rates are coordinates of F with gradients of their own size, not ≈0
        assert _relative(exact, numerical, port.rates) <= FD_RTOL
        rates = torch.cat([exact[k].flatten() for k in port.rates]).norm()
        assert rates > 1e-2 * torch.cat([exact[k].flatten() for k in weights]).norm()


@pytest.mark.parametrize("name", list(PORTS))
def test_validate_passes_the_correct_port(name):
    port = PORTS[name]()
    before = model_state(port.model)
    result = validate(port.correct, port.model, port.tasks, port.steps, port.inner_lr, **port.settings)
    assert_same_state(before, model_state(port.model))
    assert result.ok(), str(result)
    assert "agrees with finite differences" in result.reference_note, result.reference_note
    assert result.overall.overall.rel_error <= PORT_RTOL, str(result)
    for key in port.rates:  # the rate gradients were compared, under the oracle's keys
        assert key in {row.name for row in result.overall.rows}, str(result)


@pytest.mark.parametrize(("name", "label"), BROKEN, ids=[f"{n}-{label}" for n, label in BROKEN])
def test_validate_fails_the_broken_port_and_names_the_mistake(name, label):
    port = PORTS[name]()
    before = model_state(port.model)
    result = validate(port.broken[label], port.model, port.tasks, port.steps, port.inner_lr, **port.settings)
    assert_same_state(before, model_state(port.model))
    assert not result.gradient_ok(), str(result)
    assert result.diagnosis is not None and result.diagnosis.label == label, str(result)


def test_a_maml_plus_plus_port_writing_the_models_per_step_statistics_is_a_side_effect_not_a_gradient_error():
    """Per-step BatchNorm updates row k of its running statistics in place at every forward; a
    port that runs on the model's own buffers computes the right gradient (training-mode
    normalisation reads the batch's statistics) but changes the model: reported, and undone."""
    port = maml_plus_plus()
    before = model_state(port.model)
    writes = functools.partial(port.correct, share_buffers=True)
    result = validate(writes, port.model, port.tasks, port.steps, port.inner_lr, **port.settings)
    assert_same_state(before, model_state(port.model))
    assert result.gradient_ok() and not result.ok(), str(result)
    assert {e.name for e in result.side_effects} == {"norm.running_mean", "norm.running_var"}, str(result)
    assert all(e.calls == len(port.tasks) for e in result.side_effects), str(result)


def test_the_ports_are_the_definitions_they_claim():
    """The pieces of MAML++ the ports are built from, against their definitions written out:
    the multi-step weights (uniform at epoch 0, annealed toward the last step, floors and cap),
    per-step BatchNorm's row k (batch statistics, the running ones of row k updated in place),
    and LSLR's K + 1 rates per adapted tensor."""
    assert ports.multi_step_weights(4, 0, 10) == [0.25] * 4
    w = ports.multi_step_weights(4, 3, 10)
    assert w[:3] == pytest.approx([0.25 - 3 / 40] * 3) and w[3] == pytest.approx(0.25 + 9 / 40)
    late = ports.multi_step_weights(4, 100, 10)
    assert late == pytest.approx([0.0075] * 3 + [1 - 3 * 0.0075])
    net = ports.MAMLPlusPlusNet(3)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    norm = ports.PerStepBatchNorm2d(3, 3).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    expected = (x - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + 1e-5).sqrt()
    expected = expected * norm.weight[1].view(1, -1, 1, 1) + norm.bias[1].view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x, num_step=1), expected, rtol=1e-12, atol=1e-12)
    unbiased = x.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(norm.running_mean[1], 0.1 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.running_var[1], 0.9 + 0.1 * unbiased, rtol=1e-12, atol=1e-12)
    assert norm.running_mean[[0, 2]].abs().max() == 0 and (norm.running_var[[0, 2]] == 1).all()
    rates = ports.lslr_rates(net, 3, 0.1)
    assert set(rates) == set(ports.MAMLPP_ADAPTED)
    assert all(r.shape == (4,) and r.requires_grad and (r == 0.1).all() for r in rates.values())
