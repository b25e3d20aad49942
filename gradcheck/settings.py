"""Every inner-loop setting in one frozen, validated object: :class:`InnerLoop`.

Every entry point keeps its public keywords (``steps``, ``inner_lr``, ``adapt``, ``leap``, …),
builds one :class:`InnerLoop` from them — which refuses a bad value with a message naming the
argument — and hands that object down; nothing below re-checks it. A nearby setting (the
diagnosis's hypotheses, an estimator's variant) is ``loop.replace(steps=K + 1)``: validated again.

=================  =======  ==================================================================
field              symbol   meaning
=================  =======  ==================================================================
``steps``          K        inner steps (≥ 0)
``inner_lr``       α        the inner step size (> 0)
``leap``           γ        the teacher's fraction: φ_T = θ + γ(φ_K − θ), in (0, 1]
``inner_optimizer``         ``"sgd"``, ``"adam"`` or a factory ``params -> torch.optim.Optimizer``
``adapt``          A        which parameters the inner loop adapts (:mod:`gradcheck.parameters`)
``first_order``             treat the inner gradients as constants (first-order MAML)
``jacobian_step``  η        the lazy step: ``"single"`` (γα), ``"horizon"`` (γKα) or a float ≥ 0
``horizon``        T        steps differentiated by truncated backpropagation (None: all K)
``lam``            λ        iMAML's proximal strength (> 0)
``cg_iterations``           iMAML's conjugate-gradient budget (≥ 1)
``cg_tol``                  iMAML's relative residual target (> 0)
=================  =======  ==================================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

from .optim import Adam, InnerUpdate, Sgd, TorchOptimizer
from .parameters import Adapt

__all__ = ["OPTIMIZERS", "InnerLoop", "InnerOptimizer", "JacobianStep"]

InnerOptimizer = str | Callable[[list[Tensor]], torch.optim.Optimizer]
"""``"sgd"`` (the default everywhere), ``"adam"``, or a factory ``params -> torch.optim.Optimizer``."""

JacobianStep = str | float
"""η: ``"single"`` (γα), ``"horizon"`` (γKα) or a float ≥ 0."""

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}
"""The optimizers known by name: each has a pure update in :mod:`gradcheck.optim`."""


def _integer(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if int(value) < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return int(value)


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not (math.isfinite(value) and float(value) > 0)
    ):
        raise ValueError(f"{name} must be a finite real > 0, got {value!r}")
    return float(value)


def _adapt(adapt: Adapt) -> Adapt:
    """``adapt`` in a hashable form (a list of names becomes a tuple); its meaning is checked
    against the model where the model is read (:func:`gradcheck.parameters.resolve_adapt`)."""
    if adapt is None or isinstance(adapt, str) or callable(adapt):
        return adapt
    try:
        return tuple(adapt)
    except TypeError:
        raise TypeError(
            f"adapt must be None, a preset, names, prefixes or a predicate; got {adapt!r}"
        ) from None


@dataclass(frozen=True)
class InnerLoop:
    """The inner loop's settings (see the module's table), validated on construction."""

    steps: int
    inner_lr: float
    leap: float = 1.0
    inner_optimizer: InnerOptimizer = "sgd"
    adapt: Adapt = None
    first_order: bool = False
    jacobian_step: JacobianStep = "single"
    horizon: int | None = None
    lam: float = 1.0
    cg_iterations: int = 20
    cg_tol: float = 1e-10

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("steps", _integer("steps", self.steps, 0))
        for name in ("inner_lr", "leap"):
            set_(name, _real(name, getattr(self, name)))
        if self.inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {self.inner_lr}")
        if not 0 < self.leap <= 1:
            raise ValueError(f"leap (the teacher's fraction γ) must be in (0, 1], got {self.leap}")
        set_("lam", _positive("lam (the proximal strength λ)", self.lam))
        set_("cg_tol", _positive("cg_tol", self.cg_tol))
        set_("cg_iterations", _integer("cg_iterations", self.cg_iterations, 1))
        if not isinstance(self.first_order, bool):
            raise TypeError(f"first_order must be True or False, got {self.first_order!r}")
        spec = self.inner_optimizer
        if isinstance(spec, str):
            if spec not in OPTIMIZERS:
                raise ValueError(
                    f"unknown inner_optimizer {spec!r}; use one of {sorted(OPTIMIZERS)} "
                    "or a factory params -> torch.optim.Optimizer"
                )
        elif not callable(spec):
            raise TypeError(f"inner_optimizer must be a name or a factory, got {spec!r}")
        if self.horizon is not None:
            horizon = self.horizon
            if (
                isinstance(horizon, bool)
                or not isinstance(horizon, Integral)
                or not 0 <= horizon <= self.steps
            ):
                raise ValueError(f"horizon must be an integer in [0, steps={self.steps}], got {horizon!r}")
            set_("horizon", int(horizon))
        self._check_jacobian_step()
        set_("adapt", _adapt(self.adapt))

    def _check_jacobian_step(self) -> None:
        step = self.jacobian_step
        if isinstance(step, str):
            if step not in ("single", "horizon"):
                raise ValueError(f'jacobian_step must be "single", "horizon" or a float, got {step!r}')
        elif isinstance(step, Real) and not isinstance(step, bool):
            if not (math.isfinite(step) and step >= 0):
                raise ValueError(f"jacobian_step as a float (η) must be finite and >= 0, got {step}")
            object.__setattr__(self, "jacobian_step", float(step))
        else:
            raise TypeError(f'jacobian_step must be "single", "horizon" or a float, got {step!r}')

    def replace(self, **changes: Any) -> InnerLoop:
        """These settings with ``changes`` (``dataclasses.replace``: validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def eta(self) -> float:
        """η for ``jacobian_step``: "single" → γα, "horizon" → γKα, a float → itself; 0 when K = 0."""
        step = self.jacobian_step
        if isinstance(step, str):
            step = self.leap * self.inner_lr * (self.steps if step == "horizon" else 1)
        return float(step) if self.steps > 0 else 0.0

    @property
    def truncation(self) -> int:
        """T, the steps truncated backpropagation differentiates: ``horizon``, or K when unset."""
        return self.steps if self.horizon is None else self.horizon

    @property
    def is_sgd(self) -> bool:
        """Plain SGD at ``inner_lr``: the student every exact formula in this project assumes."""
        return self.inner_optimizer == "sgd"

    def require(self, *names: str, by: str) -> None:
        """Refuse an ``inner_optimizer`` other than ``names``: ``by`` can differentiate only those."""
        if self.inner_optimizer not in names:
            raise ValueError(
                f"{by} differentiates exactly through inner_optimizer in {sorted(names)}, "
                f"not {self.inner_optimizer!r}"
            )

    def optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """A fresh ``torch.optim`` inner optimizer over ``params`` (a named one at ``inner_lr``)."""
        spec = self.inner_optimizer
        if isinstance(spec, str):
            return OPTIMIZERS[spec](params, lr=self.inner_lr)
        optimizer = spec(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"inner_optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
            )
        return optimizer

    def update(self) -> InnerUpdate:
        """The inner optimizer as an update rule on ``{name: tensor}``: the pure, differentiable
        (and vmappable) update of :mod:`gradcheck.optim` for a named optimizer, or a stateful
        wrapper of the factory's ``torch.optim`` optimizer (``pure`` False: never differentiated)."""
        if self.inner_optimizer == "sgd":
            return Sgd(self.inner_lr)
        if self.inner_optimizer == "adam":
            return Adam.like(self.optimizer([torch.zeros(0, requires_grad=True)]))
        return TorchOptimizer(self.optimizer)
