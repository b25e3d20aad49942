"""The inner optimizers as update rules on ``{name: tensor}``, each written once.

An :class:`InnerUpdate` has ``init(params) -> state`` and ``step(params, grads, state) ->
(params, state)``. The pure ones (:class:`Sgd`, :class:`Adam`) are functions of their inputs —
differentiable when the inputs are, vmappable — and follow ``torch.optim`` exactly:

    SGD    p ← p − α g
    Adam   m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,   t ← t + 1,
           p ← p − (α / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)

:func:`adam_update` is that Adam on one tensor: the oracle's differentiable Adam
(:mod:`gradcheck._higher`) and every estimator's inner loop call it, so there is one Adam.
:class:`TorchOptimizer` wraps any ``torch.optim`` optimizer for graph-free inner loops: it
writes its own leaves, so it is neither differentiable nor vmappable (``pure`` is False).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["Adam", "InnerUpdate", "Sgd", "TorchOptimizer", "adam_update", "safe_sqrt"]

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


def adam_update(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, t: int, lr: float, betas: tuple[float, float], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.optim.Adam``'s step t (from 1) on one tensor: the new (p, m, v)."""
    beta1, beta2 = betas
    m = torch.lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    denom = safe_sqrt(v) / math.sqrt(1 - beta2**t) + eps
    return p - (lr / (1 - beta1**t)) * (m / denom), m, v


@dataclass(frozen=True)
class Sgd:
    """Plain SGD, p ← p − α g."""

    lr: float
    pure = True

    def init(self, params: Mapping[str, Tensor]) -> None:
        return None

    def step(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: None
    ) -> tuple[Params, None]:
        return {**params, **{n: params[n] - self.lr * g for n, g in grads.items()}}, state


@dataclass(frozen=True)
class Adam:
    """``torch.optim.Adam`` without weight decay or amsgrad, as a pure update."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    pure = True

    @classmethod
    def like(cls, optimizer: torch.optim.Optimizer) -> Adam:
        """The update of a ``torch.optim.Adam`` (its first group's lr, betas and eps)."""
        group = optimizer.param_groups[0]
        return cls(group["lr"], tuple(group["betas"]), group["eps"])

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
                params[n], g, m.get(n, zero), v.get(n, zero), t, self.lr, self.betas, self.eps
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
