"""The inner loop's hyper-parameters — K, α, γ and the student's optimizer — checked once.

Every entry point takes ``steps`` and ``inner_lr`` positionally and ``leap`` and
``inner_optimizer`` by keyword, builds one :class:`InnerLoop` from them (which refuses bad values
with a message naming the argument), and hands that object down; nothing below re-checks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor

__all__ = ["OPTIMIZERS", "InnerLoop", "InnerOptimizer"]

InnerOptimizer = str | Callable[[list[Tensor]], torch.optim.Optimizer]
"""``"sgd"`` (the default everywhere), ``"adam"``, or a factory ``params -> torch.optim.Optimizer``."""

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


@dataclass(frozen=True)
class InnerLoop:
    """K inner steps of size α with ``inner_optimizer``; the teacher leaps a fraction γ of the way.

    Refuses K < 0 or not an integer, α ≤ 0 or not finite, γ outside (0, 1], and an
    ``inner_optimizer`` that is neither a known name nor a callable.
    """

    steps: int
    inner_lr: float
    leap: float = 1.0
    inner_optimizer: InnerOptimizer = "sgd"

    def __post_init__(self) -> None:
        steps = self.steps
        if isinstance(steps, bool) or not isinstance(steps, Integral):
            raise TypeError(f"steps must be an integer, got {steps!r}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        for name in ("inner_lr", "leap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite real number, got {value!r}")
        if self.inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {self.inner_lr}")
        if not 0 < self.leap <= 1:
            raise ValueError(f"leap (the teacher's fraction γ) must be in (0, 1], got {self.leap}")
        spec = self.inner_optimizer
        if isinstance(spec, str):
            if spec not in OPTIMIZERS:
                raise ValueError(
                    f"unknown inner_optimizer {spec!r}; use one of {sorted(OPTIMIZERS)} "
                    "or a factory params -> torch.optim.Optimizer"
                )
        elif not callable(spec):
            raise TypeError(f"inner_optimizer must be a name or a factory, got {spec!r}")
        object.__setattr__(self, "steps", int(steps))
        object.__setattr__(self, "inner_lr", float(self.inner_lr))
        object.__setattr__(self, "leap", float(self.leap))

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
        """A fresh inner optimizer over ``params`` (a named one at ``inner_lr``)."""
        spec = self.inner_optimizer
        if isinstance(spec, str):
            return OPTIMIZERS[spec](params, lr=self.inner_lr)
        optimizer = spec(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"inner_optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
            )
        return optimizer
