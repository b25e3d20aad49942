"""The inner optimizers: frozen specs (what a user asks for) and pure update rules on
``{name: tensor}``, each update written once.

**Specs** — :class:`SGD`, :class:`Adam`, :class:`AdamW` — name an optimizer with its options
(never its learning rate, which is ``inner_lr``); they are hashable, validated on construction,
and what ``inner_optimizer=`` takes besides the names ``"sgd"`` and ``"adam"`` and a
factory ``params -> torch.optim.Optimizer``. :func:`spec_of` recognises a ``torch.optim.SGD``,
``Adam`` or ``AdamW`` made by a factory from its ``param_groups`` and refuses, by name, an option
no pure update here follows (``maximize``, ``amsgrad``, several parameter groups, another class);
``foreach``, ``fused``, ``capturable`` and ``differentiable`` change how torch computes, not what.

**The updates** follow ``torch.optim`` exactly (g the gradient, t the step from 1, λ the weight
decay, μ the momentum, τ the dampening):

    SGD    g ← g + λp;  b ← g (t = 1), μb + (1 − τ)g (t > 1);  g ← g + μb (Nesterov) or b;
           p ← p − α g
    Adam   g ← g + λp (Adam, coupled L2) or p ← p(1 − αλ) (AdamW, decoupled);
           m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,
           p ← p − (α / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)

:func:`sgd_update` and :func:`adam_update` are those steps on one tensor: the oracle's
differentiable optimizers (:mod:`gradcheck._higher`) and every estimator's inner loop (the pure
:class:`Sgd` and :class:`AdamUpdate`, via :meth:`gradcheck.settings.InnerLoop.update`) call
them, so each rule exists once. The pure updates are functions of their inputs —
differentiable when the inputs are, vmappable. :class:`TorchOptimizer` wraps any ``torch.optim``
optimizer for graph-free inner loops: it writes its own leaves, so it is neither differentiable
nor vmappable (``pure`` is False).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

__all__ = [
    "SGD",
    "SPECS",
    "Adam",
    "AdamUpdate",
    "AdamW",
    "InnerUpdate",
    "Sgd",
    "Spec",
    "TorchOptimizer",
    "adam_update",
    "safe_sqrt",
    "sgd_update",
    "spec_of",
]

Params = dict[str, Tensor]


class InnerUpdate(Protocol):
    """One inner optimizer: ``state = init(params)``, then ``params, state = step(params, grads, state)``."""

    @property
    def pure(self) -> bool:
        """Whether ``step`` is a pure function (differentiable, vmappable)."""
        ...

    def init(self, params: Mapping[str, Tensor]) -> Any: ...

    def step(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Any
    ) -> tuple[Params, Any]:
        """The parameters after one step on ``grads`` (the names of ``grads`` are updated)."""
        ...


def safe_sqrt(v: Tensor) -> Tensor:
    """√v whose derivative at v = 0 is 0 rather than ∞·0 = nan (√ is not differentiable there)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), 0.0)


def sgd_update(
    p: Tensor,
    g: Tensor,
    buf: Tensor | None,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """``torch.optim.SGD``'s step on one tensor: the new (p, momentum buffer); ``buf`` is None
    before the first step (the buffer starts as the first gradient, undampened).

    Written as torch's own step is, each scaled sum one ``add`` with ``alpha`` (p + α·g in one
    rounding where the kernel fuses it, and one operation less per step to differentiate): the
    hyper-parameters are Python numbers, as ``alpha`` requires (learned rates, which are tensors,
    step by :class:`gradcheck.rates.Schedule`)."""
    if weight_decay != 0:
        g = torch.add(g, p, alpha=weight_decay)
    if momentum != 0:
        buf = g if buf is None else torch.add(momentum * buf, g, alpha=1 - dampening)
        g = torch.add(g, buf, alpha=momentum) if nesterov else buf
    return torch.add(p, g, alpha=-lr), buf


def adam_update(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    t: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.optim.Adam``'s step t (from 1) on one tensor — ``torch.optim.AdamW``'s with
    ``decoupled`` — the new (p, m, v)."""
    beta1, beta2 = betas
    if weight_decay != 0:
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = torch.lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    denom = safe_sqrt(v) / math.sqrt(1 - beta2**t) + eps
    return p - (lr / (1 - beta1**t)) * (m / denom), m, v


def _number(owner: str, name: str, value: object, low: float = 0.0, below: float | None = None) -> float:
    """``value`` as a float in [low, below) — a bool, a non-finite or out-of-range value refused."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise TypeError(f"{owner}: {name} must be a finite real number, got {value!r}")
    value = float(value)
    if value < low or (below is not None and value >= below):
        bound = f"in [{low:g}, {below:g})" if below is not None else f">= {low:g}"
        raise ValueError(f"{owner}: {name} must be {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SGD:
    """``torch.optim.SGD`` with these options at ``inner_lr`` (``SGD()`` is plain SGD, ``"sgd"``)."""

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    name: ClassVar[str] = "sgd"
    torch_class: ClassVar[Callable[..., torch.optim.Optimizer]] = torch.optim.SGD

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("momentum", _number("SGD", "momentum", self.momentum))
        set_("dampening", _number("SGD", "dampening", self.dampening))
        set_("weight_decay", _number("SGD", "weight_decay", self.weight_decay))
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"SGD: nesterov must be True or False, got {self.nesterov!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening 0 (as torch.optim.SGD)")

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``torch.optim.SGD`` besides ``lr``."""
        return {
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }

    def update(self, lr: float) -> Sgd:
        """The pure update at step size ``lr``."""
        return Sgd(lr, self.momentum, self.dampening, self.nesterov, self.weight_decay)


def _betas(owner: str, betas: object) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{owner}: betas must be a pair (β₁, β₂), got {betas!r}")
    return (_number(owner, "β₁", betas[0], 0.0, 1.0), _number(owner, "β₂", betas[1], 0.0, 1.0))


@dataclass(frozen=True)
class Adam:
    """``torch.optim.Adam`` with these options at ``inner_lr``: ``weight_decay`` is coupled L2
    (added to the gradient). ``Adam()`` is ``"adam"``."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    name: ClassVar[str] = "adam"
    torch_class: ClassVar[Callable[..., torch.optim.Optimizer]] = torch.optim.Adam
    decoupled: ClassVar[bool] = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "betas", _betas(owner, self.betas))
        object.__setattr__(self, "eps", _number(owner, "eps", self.eps))
        object.__setattr__(self, "weight_decay", _number(owner, "weight_decay", self.weight_decay))

    def options(self) -> dict[str, Any]:
        """The keyword arguments of the ``torch.optim`` class besides ``lr``."""
        return {"betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def update(self, lr: float) -> AdamUpdate:
        """The pure update at step size ``lr``."""
        return AdamUpdate(lr, self.betas, self.eps, self.weight_decay, self.decoupled)


@dataclass(frozen=True)
class AdamW(Adam):
    """``torch.optim.AdamW`` with these options at ``inner_lr``: ``weight_decay`` is decoupled,
    p ← p(1 − αλ) before the Adam step. ``AdamW()`` has λ = 0.01, torch's default (no name stands for it)."""

    weight_decay: float = 1e-2
    name: ClassVar[str] = "adamw"
    torch_class: ClassVar[Callable[..., torch.optim.Optimizer]] = torch.optim.AdamW
    decoupled: ClassVar[bool] = True


Spec = SGD | Adam | AdamW
"""An inner optimizer with its options (its learning rate is ``inner_lr``)."""

SPECS: dict[str, Spec] = {"sgd": SGD(), "adam": Adam(), "adamw": AdamW()}
"""The optimizers known by name, at torch's default options."""

_IGNORED = frozenset({"params", "lr", "foreach", "fused", "capturable", "differentiable"})
"""``param_groups`` keys that do not change what a step computes (``lr`` is checked apart)."""
_REFUSED = ("maximize", "amsgrad")
"""Options no pure update follows: refused when set."""


def spec_of(optimizer: torch.optim.Optimizer) -> tuple[Spec, float]:
    """The spec and the learning rate of a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (exactly
    those classes, one parameter group), read from its ``param_groups``; anything a pure update
    here does not follow is refused by name (``ValueError``)."""
    kind = type(optimizer)
    known = {spec.torch_class: spec for spec in SPECS.values()}
    if kind not in known:
        raise ValueError(
            f"{kind.__module__}.{kind.__qualname__} is not one of torch.optim.SGD, Adam, AdamW "
            "(the inner optimizers with a pure, differentiable update)"
        )
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"{kind.__name__} with {len(optimizer.param_groups)} parameter groups: use one")
    group = optimizer.param_groups[0]
    refused = [name for name in _REFUSED if group.get(name)]
    if refused:
        raise ValueError(
            f"{kind.__name__} with {', '.join(f'{n}=True' for n in refused)} is not differentiated"
        )
    spec: Spec
    if kind is torch.optim.SGD:
        spec = SGD(group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"])
        read = {"momentum", "dampening", "nesterov", "weight_decay", *_REFUSED}
    else:
        decoupled = group.get("decoupled_weight_decay", kind is torch.optim.AdamW)
        spec = (AdamW if decoupled else Adam)(tuple(group["betas"]), group["eps"], group["weight_decay"])
        read = {"betas", "eps", "weight_decay", "decoupled_weight_decay", *_REFUSED}
    unknown = sorted(set(group) - read - _IGNORED)
    if unknown:
        raise ValueError(f"{kind.__name__} has options {unknown} that no pure update here follows")
    return spec, float(group["lr"])


@dataclass(frozen=True)
class Sgd:
    """SGD as ``torch.optim.SGD`` computes it (:func:`sgd_update`); plain SGD, p ← p − α g, by default."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    pure = True

    def init(self, params: Mapping[str, Tensor]) -> Params:
        return {}  # the momentum buffers, none before the first step

    def step(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Params
    ) -> tuple[Params, Params]:
        out, buffers = dict(params), dict(state)
        for n, g in grads.items():
            out[n], buf = sgd_update(
                params[n],
                g,
                buffers.get(n),
                self.lr,
                self.momentum,
                self.dampening,
                self.nesterov,
                self.weight_decay,
            )
            if buf is not None:
                buffers[n] = buf
        return out, buffers


@dataclass(frozen=True)
class AdamUpdate:
    """``torch.optim.Adam`` (``decoupled``: ``AdamW``) without amsgrad, as a pure update."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    pure = True

    def init(self, params: Mapping[str, Tensor]) -> tuple[int, Params, Params]:
        return 0, {}, {}

    def step(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: tuple[int, Params, Params]
    ) -> tuple[Params, tuple[int, Params, Params]]:
        t, m, v = state[0] + 1, dict(state[1]), dict(state[2])
        out = dict(params)
        for n, g in grads.items():
            zero = torch.zeros_like(g)
            out[n], m[n], v[n] = adam_update(
                params[n],
                g,
                m.get(n, zero),
                v.get(n, zero),
                t,
                self.lr,
                self.betas,
                self.eps,
                self.weight_decay,
                self.decoupled,
            )
        return out, (t, m, v)


@dataclass(frozen=True)
class TorchOptimizer:
    """Any ``torch.optim`` optimizer, made by ``factory(leaves)``, stepping copies of the parameters
    (graph-free inner loops only: it writes its leaves in place)."""

    factory: Callable[[list[Tensor]], torch.optim.Optimizer]
    pure = False

    def init(self, params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], torch.optim.Optimizer]:
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
        return leaves, self.factory(list(leaves.values()))

    def step(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        state: tuple[dict[str, Tensor], torch.optim.Optimizer],
    ) -> tuple[Params, tuple[dict[str, Tensor], torch.optim.Optimizer]]:
        leaves, optimizer = state
        for n, leaf in leaves.items():
            leaf.grad = grads[n].detach() if n in grads else None
        optimizer.step()
        return {**params, **{n: leaf.detach().clone() for n, leaf in leaves.items() if n in grads}}, state
