"""Every inner-loop setting in one frozen, validated object: :class:`InnerLoop`.

Every entry point keeps its public keywords (``steps``, ``inner_lr``, ``adapt``, ``leap``, …),
builds one :class:`InnerLoop` from them — which refuses a bad value with a message naming the
argument — and hands that object down; nothing below re-checks it. A nearby setting (the
diagnosis's hypotheses, an estimator's variant) is ``loop.replace(steps=K + 1)``: validated again.

=================  =======  ==================================================================
field              symbol   meaning
=================  =======  ==================================================================
``steps``          K        inner steps (≥ 0)
``inner_lr``       α        the inner step size: a float > 0, or learned rates
                            (:mod:`gradcheck.rates`: a tensor or {name: tensor}; they step plain
                            SGD, so any other ``inner_optimizer`` is refused with them)
``per_step_lr``             learned rates have a leading step dimension (MAML++'s LSLR)
``query_weights``  w        the multi-step loss F = Σ_k w_k L_Q(φ_{k+1}) (K finite weights, K ≥ 1,
                            γ = 1: the leap is defined for the last point only; None: L_Q(φ_T))
``step_kwarg``              the keyword that passes the step index k to the model (MAML++'s
                            ``forward(x, num_step=k)``): the support loss of step k and the
                            query loss right after step k see k; the final one K − 1 (0 at K = 0)
``leap``           γ        the teacher's fraction: φ_T = θ + γ(φ_K − θ), in (0, 1]
``inner_optimizer``         ``"sgd"``, ``"adam"``, a spec (:mod:`gradcheck.optim`: ``SGD(momentum=…,
                            …)``, ``Adam(…)``, ``AdamW(…)``) or a factory
                            ``params -> torch.optim.Optimizer``
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, cast

import torch
from torch import Tensor

from .optim import SGD, SPECS, Adam, AdamW, InnerUpdate, Spec, TorchOptimizer, spec_of
from .parameters import Adapt
from .rates import Rates

__all__ = ["OPTIMIZERS", "InnerLoop", "InnerOptimizer", "JacobianStep", "LearningRate"]

InnerOptimizer = str | Spec | Callable[[list[Tensor]], torch.optim.Optimizer]
"""``"sgd"`` (the default everywhere), ``"adam"``, a spec of :mod:`gradcheck.optim` (``SGD``,
``Adam``, ``AdamW`` with options; at torch's defaults it is normalised to its name, ``SGD()`` to
``"sgd"``), or a factory ``params -> torch.optim.Optimizer``."""

JacobianStep = str | float
"""η: ``"single"`` (γα), ``"horizon"`` (γKα) or a float ≥ 0."""

LearningRate = float | Tensor | Mapping[str, Tensor]
"""``inner_lr`` as the public entry points take it: one α, or learned rates (:mod:`gradcheck.rates`)."""

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}
"""The optimizers known by name: each has a pure update in :mod:`gradcheck.optim` (AdamW is
given as the spec ``gradcheck.optim.AdamW(...)``)."""

_SPEC_KINDS = (SGD, Adam, AdamW)


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
    inner_lr: float | Rates
    leap: float = 1.0
    inner_optimizer: InnerOptimizer = "sgd"
    adapt: Adapt = None
    first_order: bool = False
    jacobian_step: JacobianStep = "single"
    horizon: int | None = None
    lam: float = 1.0
    cg_iterations: int = 20
    cg_tol: float = 1e-10
    per_step_lr: bool = False
    query_weights: tuple[float, ...] | None = None
    step_kwarg: str | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("steps", _integer("steps", self.steps, 0))
        set_("leap", _real("leap", self.leap))
        if not isinstance(self.per_step_lr, bool):
            raise TypeError(f"per_step_lr must be True or False, got {self.per_step_lr!r}")
        if isinstance(self.inner_lr, Real) and not isinstance(self.inner_lr, bool):
            if self.per_step_lr:
                raise ValueError(
                    "per_step_lr=True needs rates with a leading step dimension, not a float inner_lr"
                )
            set_("inner_lr", _real("inner_lr", self.inner_lr))
            if self.inner_lr <= 0:
                raise ValueError(f"inner_lr must be > 0, got {self.inner_lr}")
        else:
            set_("inner_lr", Rates.of(self.inner_lr, self.per_step_lr))
        self._check_query_weights()
        if self.step_kwarg is not None and not (
            isinstance(self.step_kwarg, str) and self.step_kwarg.isidentifier()
        ):
            raise TypeError(f"step_kwarg must be a keyword name (e.g. 'num_step'), got {self.step_kwarg!r}")
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
                    f"unknown inner_optimizer {spec!r}; use one of {sorted(OPTIMIZERS)}, a spec "
                    "(gradcheck.optim.SGD, Adam, AdamW) or a factory params -> torch.optim.Optimizer"
                )
        elif isinstance(spec, _SPEC_KINDS):
            if spec.name in OPTIMIZERS and SPECS[spec.name] == spec:
                set_("inner_optimizer", spec.name)  # one form for plain SGD and Adam
        elif not callable(spec):
            raise TypeError(f"inner_optimizer must be a name, a spec or a factory, got {spec!r}")
        if self.learned and self.inner_optimizer != "sgd":
            raise ValueError(
                "learned inner rates (a tensor or a mapping inner_lr) step plain SGD, φ − α ⊙ g; "
                f"they do not combine with inner_optimizer={self.inner_optimizer!r}"
            )
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

    def _check_query_weights(self) -> None:
        weights = self.query_weights
        if weights is None:
            return
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            raise TypeError(f"query_weights must be a sequence of K floats, got {weights!r}")
        if isinstance(weights, Tensor):
            weights = weights.tolist()
        weights = tuple(_real("query_weights entry", w) for w in weights)
        if self.steps == 0:
            raise ValueError(
                "query_weights (a multi-step loss) needs steps >= 1: with steps=0 there is no step"
            )
        if len(weights) != self.steps:
            raise ValueError(
                f"query_weights must have one weight per inner step (steps={self.steps}), got {len(weights)}"
            )
        if self.leap != 1:
            raise ValueError("query_weights (a multi-step loss) and a leap γ != 1 do not combine: use one")
        object.__setattr__(self, "query_weights", weights)

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

    @classmethod
    def given(
        cls,
        steps: int,
        inner_lr: LearningRate,
        leap: float = 1.0,
        inner_optimizer: InnerOptimizer = "sgd",
        *,
        query_weights: Sequence[float] | None = None,
        **settings: Any,
    ) -> InnerLoop:
        """The settings from an entry point's public keywords: ``inner_lr`` as a float, a tensor or
        a mapping (read as :class:`~gradcheck.rates.Rates`), ``query_weights`` as any sequence
        (read as a tuple), every other field by name."""
        rates = cast("float | Rates", inner_lr)  # __post_init__ reads a tensor or mapping as Rates
        weights = cast("tuple[float, ...] | None", query_weights)  # and checks it, as a tuple
        return cls(steps, rates, leap, inner_optimizer, query_weights=weights, **settings)

    def replace(self, **changes: Any) -> InnerLoop:
        """These settings with ``changes`` (``dataclasses.replace``: validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def learned(self) -> bool:
        """Whether ``inner_lr`` holds rates (tensors) rather than one float."""
        return isinstance(self.inner_lr, Rates)

    @property
    def given_lr(self) -> Any:
        """``inner_lr`` as the caller gave it (a float, or the tensor or mapping of the rates)."""
        return self.inner_lr.given if isinstance(self.inner_lr, Rates) else self.inner_lr

    def lr(self, by: str) -> float:
        """α as one float; ``ValueError`` naming ``by`` when the rates are tensors, which ``by``
        does not take."""
        if isinstance(self.inner_lr, Rates):
            raise ValueError(
                f"{by} takes inner_lr as one float; learned inner rates (a tensor or a mapping) are "
                "taken by the oracle, finite differences, validate, diagnose and the estimators "
                "maml, first_order and lazy"
            )
        return self.inner_lr

    @property
    def extended(self) -> tuple[str, ...]:
        """Which of learned rates (``"inner_lr"``), ``"query_weights"`` and ``"step_kwarg"`` are
        set: the settings beyond one float α and L_Q(φ_T) that not every consumer reads."""
        given = {
            "inner_lr": self.learned,
            "query_weights": self.query_weights is not None,
            "step_kwarg": self.step_kwarg is not None,
        }
        return tuple(name for name, used in given.items() if used)

    def indexed(self, f: Callable[..., Any], k: int) -> Callable[..., Any]:
        """The model ``f`` told the step index k through ``step_kwarg`` (``f`` itself when unset)."""
        if self.step_kwarg is None:
            return f
        kwarg = self.step_kwarg
        return lambda *args, **kwargs: f(*args, **{kwarg: k}, **kwargs)

    def scored(self) -> dict[int, float]:
        """{k: w}: the query loss is scored at φ_k with weight w — {K: 1} by default, {k + 1: w_k}
        for ``query_weights``."""
        if self.query_weights is None:
            return {self.steps: 1.0}
        return {k + 1: w for k, w in enumerate(self.query_weights)}

    @property
    def eta(self) -> float:
        """η for ``jacobian_step``: "single" → γα, "horizon" → γKα, a float → itself; 0 when K = 0."""
        step = self.jacobian_step
        if isinstance(step, str):
            step = self.leap * self.lr("the lazy step η = γα") * (self.steps if step == "horizon" else 1)
        return float(step) if self.steps > 0 else 0.0

    @property
    def truncation(self) -> int:
        """T, the steps truncated backpropagation differentiates: ``horizon``, or K when unset."""
        return self.steps if self.horizon is None else self.horizon

    @property
    def is_sgd(self) -> bool:
        """Plain SGD at ``inner_lr``: the student every exact formula in this project assumes."""
        return self.inner_optimizer == "sgd"

    def spec(self) -> Spec:
        """The inner optimizer as a spec of :mod:`gradcheck.optim`: a name's (at torch's
        defaults), a spec itself, or the one a factory's ``torch.optim.SGD``/``Adam``/``AdamW``
        has (:func:`gradcheck.optim.spec_of`; its lr must be ``inner_lr``). ``ValueError``, with
        the reason, for a factory no spec describes."""
        given = self.inner_optimizer
        if isinstance(given, str):
            return SPECS[given]
        if isinstance(given, _SPEC_KINDS):
            return given
        spec, lr = spec_of(self.optimizer([torch.zeros(1, requires_grad=True)]))
        if lr != self.lr("an inner_optimizer factory"):
            raise ValueError(f"its {spec.torch_class.__name__}'s lr {lr!r} is not inner_lr {self.inner_lr!r}")
        return spec

    def require(self, *names: str | type, by: str) -> None:
        """Refuse an ``inner_optimizer`` that ``by`` cannot differentiate: ``names`` are the names
        it takes and the spec classes (:mod:`gradcheck.optim`) whose every option it follows —
        a spec of such a class, or a factory of its ``torch.optim`` class at ``inner_lr``."""
        given = self.inner_optimizer
        if isinstance(given, str) and given in names:
            return
        kinds = tuple(n for n in names if isinstance(n, type))
        reason = ""
        if kinds and not isinstance(given, str):
            try:
                if type(self.spec()) in kinds:
                    return
            except ValueError as error:
                reason = f": {error}"
        shown = sorted(n for n in names if isinstance(n, str))
        also = ""
        if kinds:
            also = f" or a gradcheck.optim spec {', '.join(k.__name__ for k in kinds)}"
            also += " (or a factory of that torch.optim class at inner_lr)"
        raise ValueError(
            f"{by} differentiates exactly through inner_optimizer in {shown}{also}, not {given!r}{reason}"
        )

    def optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """A fresh ``torch.optim`` inner optimizer over ``params`` (a named one or a spec at ``inner_lr``)."""
        spec = self.inner_optimizer
        if isinstance(spec, str):
            spec = SPECS[spec]
        if isinstance(spec, _SPEC_KINDS):
            return spec.torch_class(params, lr=self.lr("a torch.optim inner optimizer"), **spec.options())
        optimizer = spec(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"inner_optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
            )
        return optimizer

    def update(self) -> InnerUpdate:
        """The inner optimizer as an update rule on ``{name: tensor}``: the pure, differentiable
        (and vmappable) update of :mod:`gradcheck.optim` for a name or a spec, or a stateful
        wrapper of the factory's ``torch.optim`` optimizer (``pure`` False: never differentiated)."""
        given = self.inner_optimizer
        if isinstance(given, (str, *_SPEC_KINDS)):
            return self.spec().update(self.lr("the inner optimizer's update"))
        return TorchOptimizer(self.optimizer)
